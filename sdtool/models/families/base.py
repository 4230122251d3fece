"""What a model family is: everything that differs between SD 1.x, SD 2.x (and the families to come) behind one seam.

A family knows how to recognise its weights (in LDM single files and in diffusers configs), how its text encoder is
laid out in an LDM file, which shipped diffusers configs and tokenizer a bare single file is read with, and how it
is named in modelspec metadata. Everything else in sdtool (loading, saving, converting, training, sampling) asks
the family instead of branching on the model type itself; adding a family means adding one module here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

# The diffusers configs sdtool ships for single files loaded without `--config` (package data).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class ModelFamily:
    """One family of Stable Diffusion models. Subclasses are used through their single instance."""

    name: ClassVar[str]  # the value of --model-type and of SDModel.model_type ("v1", "v2", …)
    title: ClassVar[str]  # for people: "SD v1"
    # LDM single-file prefixes of this family's text encoder(s)
    text_encoder_prefixes: ClassVar[tuple[str, ...]]
    # LDM U-Net transformer proj_in/out: linear [C, C] weights, else 1×1 convs [C, C, 1, 1]
    linear_projection: ClassVar[bool]
    # (hub repo, subfolder) of the tokenizer a bare single file of this family is read with
    default_tokenizer: ClassVar[tuple[str, str | None]]
    # modelspec architecture per prediction type: {False: epsilon, True: v-prediction}
    architectures: ClassVar[dict[bool, str]]
    # shipped diffusers config folder per prediction type: {False: epsilon, True: v-prediction}
    config_names: ClassVar[dict[bool, str]]
    # native image size per prediction type (modelspec resolution, default training resolution)
    resolutions: ClassVar[dict[bool, int]]
    # what kohya's `v2` flag says for this family (True for SD 2.x only)
    kohya_v2: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def architecture(self, v_prediction: bool) -> str:
        """The modelspec architecture, e.g. stable-diffusion-v2-768-v."""
        return self.architectures[bool(v_prediction)]

    def owns_architecture(self, architecture: str) -> bool:
        """Whether a modelspec architecture names this family."""
        return architecture.strip().lower() in self.architectures.values()

    def prediction_from_architecture(self, architecture: str) -> bool | None:
        """v-prediction as a modelspec architecture of this family says it (None: not this family's name)."""
        arch = architecture.strip().lower()
        if arch == self.architectures[True] and arch != self.architectures[False]:
            return True
        return False if arch == self.architectures[False] else None

    def config_dir(self, v_prediction: bool) -> Path:
        """The shipped diffusers configs for this family and prediction type."""
        return CONFIGS_DIR / self.config_names[bool(v_prediction)]

    def default_resolution(self, v_prediction: bool) -> int:
        """The side of the square images the family's base models were trained on."""
        return self.resolutions[bool(v_prediction)]

    def has_text_encoder(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether an LDM state dict holds this family's text encoder."""
        return any(key.startswith(self.text_encoder_prefixes) for key in state_dict)

    def text_encoder_to_ldm(self, state_dict: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        """The text encoder's diffusers state dict in this family's LDM layout (`extras` as `ldm_extras` gave)."""
        raise NotImplementedError

    def ldm_extras(self, state_dict: Mapping[str, Any], config_dir: Path) -> dict[str, Any]:
        """LDM keys of a source file that the diffusers text encoder (configured in `config_dir`) has no place for,
        kept to be written again on save."""
        return {}

    @property
    def prediction_matters(self) -> bool:
        """Whether the family has epsilon and v-prediction variants that a file without metadata cannot tell apart."""
        return self.architectures[True] != self.architectures[False]
