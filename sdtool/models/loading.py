"""Load an SD v1.x / v2.x model: every `from_pretrained` / `from_single_file` call lives in this package.

`load_model` returns an `SDModel` with the components and what was detected about them (v1 or v2, epsilon or v).
Sources: a diffusers folder or a hub id (single files: see the model I/O issue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdtool.errors import ModelError, UsageError
from sdtool.runtime import quiet_third_party

ModelTypeArg = Literal["auto", "v1", "v2"]
PredictionArg = Literal["auto", "epsilon", "v"]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDModel:
    """The parts of a Stable Diffusion model sdtool works with, and what it is."""

    source: str
    v2: bool
    v_prediction: bool
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    @property
    def model_type(self) -> str:
        return "v2" if self.v2 else "v1"


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def detect_v2(unet_config: dict[str, Any] | None, text_config: dict[str, Any] | None) -> bool | None:
    """v2 from the weights' configs: cross-attention width 1024, or an OpenCLIP-style text encoder (gelu)."""
    if unet_config is not None and unet_config.get("cross_attention_dim") == 1024:
        return True
    if text_config is not None:
        return bool(text_config.get("hidden_size") == 1024 or text_config.get("hidden_act") == "gelu")
    if unet_config is not None:
        return unet_config.get("cross_attention_dim") == 1024
    return None


def resolve_flags(
    detected_v2: bool | None,
    detected_v: bool | None,
    model_type: ModelTypeArg = "auto",
    prediction: PredictionArg = "auto",
    where: str = "",
) -> tuple[bool, bool]:
    """Explicit choices win over detection; an explicit choice that contradicts the weights is an error."""
    v2 = detected_v2 if detected_v2 is not None else False
    if model_type != "auto":
        wanted = model_type == "v2"
        if detected_v2 is not None and wanted != detected_v2:
            raise UsageError(
                f"{where}: model type {model_type} contradicts the weights, which are {'v2' if detected_v2 else 'v1'}",
                hint="drop the explicit model type or pick the right model",
            )
        v2 = wanted
    v = bool(detected_v)
    if prediction != "auto":
        v = prediction == "v"
    return v2, v


def load_model(
    source: str | Path,
    *,
    config: str | Path | None = None,
    model_type: ModelTypeArg = "auto",
    prediction: PredictionArg = "auto",
    allow_pickle: bool = False,
    dtype: Any = None,
    components: tuple[str, ...] = COMPONENTS,
) -> SDModel:
    """Load the requested components of an SD model from a diffusers folder or a hub id."""
    quiet_third_party()
    src = str(source)
    path = Path(src)
    if path.exists() and not _is_diffusers_folder(path):
        raise ModelError(f"{src}: not a diffusers folder", hint="single files are converted with 'sdtool convert'")
    if not path.exists() and (src.count("/") != 1 or src.startswith((".", "/"))):
        raise ModelError(f"{src}: no such file or folder, and not a hub id (owner/name)")
    return _load_diffusers(src, model_type, prediction, dtype, components)


def _load_diffusers(
    src: str, model_type: ModelTypeArg, prediction: PredictionArg, dtype: Any, components: tuple[str, ...]
) -> SDModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        scheduler_config = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
        unet_config = dict(UNet2DConditionModel.load_config(src, subfolder="unet"))
        text_config = _text_config(src)
        loaded: dict[str, Any] = {}
        if "unet" in components:
            loaded["unet"] = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kwargs)
        if "vae" in components:
            loaded["vae"] = AutoencoderKL.from_pretrained(src, subfolder="vae", **kwargs)
        if "text_encoder" in components:
            te_kwargs = {"dtype": dtype} if dtype is not None else {}
            loaded["text_encoder"] = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **te_kwargs)
        if "tokenizer" in components:
            loaded["tokenizer"] = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    except OSError as exc:
        raise ModelError(f"{src}: cannot load the model ({exc})") from exc
    detected_v = scheduler_config.get("prediction_type") == "v_prediction"
    v2, v = resolve_flags(detect_v2(unet_config, text_config), detected_v, model_type, prediction, src)
    return SDModel(source=src, v2=v2, v_prediction=v, scheduler_config=scheduler_config, **loaded)


def _text_config(src: str) -> dict[str, Any] | None:
    from transformers import CLIPTextConfig

    try:
        return CLIPTextConfig.from_pretrained(src, subfolder="text_encoder").to_dict()
    except OSError:
        return None


def load_vae(source: str | Path, *, dtype: Any = None, allow_pickle: bool = False) -> Any:
    """A VAE from a VAE-only diffusers folder, or the `vae/` of a full model folder or hub id."""
    quiet_third_party()
    from diffusers import AutoencoderKL

    src = str(source)
    path = Path(src)
    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(src, **kwargs)
        return AutoencoderKL.from_pretrained(src, subfolder="vae", **kwargs)
    except OSError as exc:
        raise ModelError(f"{src}: cannot load a VAE ({exc})") from exc
