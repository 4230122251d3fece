"""sdtool: fine-tune Stable Diffusion (v1, v2 and SDXL) models from the command line."""

__version__ = "0.1.0"
