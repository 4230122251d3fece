"""Load a Stable Diffusion model: every `from_pretrained` / `from_single_file` call lives in this package.

`load_model` returns an `SDModel` with the components and what was detected about them (the model family, epsilon
or v prediction).
Sources: a diffusers folder, a hub id, or a single file (.safetensors, .ckpt/.pt) in the original LDM layout.

Single files are loaded through diffusers' own single-file support (`from_single_file`), which needs diffusers
configs: those of `config=` (a diffusers folder), or else the family's defaults shipped in `sdtool/models/configs/`
(SD1.5, SD2-512, SD2-768-v). The defaults carry no tokenizer; it comes from the hub (or its cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdtool.console import warn
from sdtool.errors import ModelError, UsageError
from sdtool.models import families
from sdtool.models.families.base import ModelFamily, TextPart
from sdtool.models.families.sdxl import V_PRED_MARKER, ZTSNR_MARKER
from sdtool.runtime import quiet_third_party

ModelTypeArg = Literal["auto", "v1", "v2", "sdxl"]


PredictionArg = Literal["auto", "epsilon", "v"]


# "text_encoder" and "tokenizer" stand for all of a family's text encoders and tokenizers (SDXL has two of each).
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDModel:
    """The parts of a Stable Diffusion model sdtool works with, and what it is."""

    source: str
    family: ModelFamily
    v_prediction: bool
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    text_encoder_2: Any = None  # SDXL's OpenCLIP ViT-bigG (with projection)
    tokenizer_2: Any = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    # Text-encoder keys of a source single file that diffusers has no place for (the family's `ldm_extras`, e.g.
    # OpenCLIP's `text_projection`): carried into single files saved from this model.
    ldm_extras: dict[str, Any] = field(default_factory=dict)
    # The source file's safetensors metadata (modelspec …), {} otherwise.
    source_metadata: dict[str, str] = field(default_factory=dict)
    # The float dtype the source stores its weights in (None when unknown), whatever `dtype` they were loaded in.
    source_dtype: Any = None

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    @property
    def text_encoders(self) -> list[Any]:
        """The family's text encoders, in the order their states are concatenated."""
        return [getattr(self, part.encoder) for part in self.family.text_parts]

    @property
    def tokenizers(self) -> list[Any]:
        """The tokenizer of each text encoder."""
        return [getattr(self, part.tokenizer) for part in self.family.text_parts]

    @property
    def model_type(self) -> str:
        """The family's name, as --model-type spells it."""
        return self.family.name

    @property
    def v2(self) -> bool:
        """Whether this is an SD 2.x model (the `v2` of kohya's configs)."""
        return self.family.kohya_v2


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def resolve_family(
    detected: ModelFamily | None,
    detected_v: bool | None,
    model_type: ModelTypeArg = "auto",
    prediction: PredictionArg = "auto",
    where: str = "",
) -> tuple[ModelFamily, bool]:
    """Explicit choices win over detection; an explicit family that contradicts the weights is an error."""
    family = detected if detected is not None else families.by_name("v1")
    if model_type != "auto":
        wanted = families.by_name(model_type)
        if detected is not None and wanted is not detected:
            raise UsageError(
                f"{where}: model type {model_type} contradicts the weights, which are {detected.name}",
                hint="drop the explicit model type or pick the right model",
            )
        family = wanted
    v = bool(detected_v)
    if prediction != "auto":
        v = prediction == "v"
        if detected_v is not None and v != detected_v:
            said = "v_prediction" if detected_v else "epsilon"
            warn(f"{where}: predicting {'v' if v else 'epsilon'} as asked, although the model says {said}")
    return family, v


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
    """Load the requested components of an SD model from a diffusers folder, a hub id or a single file.

    `config` (a diffusers folder) supplies configs, tokenizer and scheduler for a single file; explicit
    `model_type` / `prediction` win over detection, and a model type that contradicts the weights is a UsageError.
    `dtype` None keeps diffusers' default (fp32); `components` may omit any of unet, vae, text_encoder, tokenizer.
    """
    quiet_third_party()
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise UsageError(f"unknown model components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    src = str(source)
    path = Path(src)
    if path.is_file():
        return _load_single_file(path, config, model_type, prediction, allow_pickle, dtype, components)
    if path.exists() and not _is_diffusers_folder(path):
        raise ModelError(
            f"{src}: neither a diffusers folder nor a single file", hint="expected model_index.json or unet/ inside"
        )
    if not path.exists() and (src.count("/") != 1 or src.startswith((".", "/"))):
        raise ModelError(f"{src}: no such file or folder, and not a hub id (owner/name)")
    if config is not None:
        raise UsageError(f"{src}: a config folder only applies to single-file models (a diffusers model has its own)")
    return _load_diffusers(src, model_type, prediction, dtype, components)


def _load_diffusers(
    src: str, model_type: ModelTypeArg, prediction: PredictionArg, dtype: Any, components: tuple[str, ...]
) -> SDModel:
    import transformers

    name, src = src, local_copy(src, components)  # messages name the model as given; files come from a folder
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        scheduler_config = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
        unet_config = dict(UNet2DConditionModel.load_config(src, subfolder="unet"))
        text_config = _text_config(src)
        detected_v = scheduler_config.get("prediction_type") == "v_prediction"
        detected = families.detect_configs(unet_config, text_config)
        family, v = resolve_family(detected, detected_v, model_type, prediction, name)
        loaded: dict[str, Any] = {}
        if "unet" in components:
            loaded["unet"] = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kwargs)
        if "vae" in components:
            loaded["vae"] = AutoencoderKL.from_pretrained(src, subfolder="vae", **kwargs)
        for part in family.text_parts:
            if "text_encoder" in components:
                te_kwargs = {"dtype": dtype} if dtype is not None else {}
                encoder_class = getattr(transformers, part.encoder_class)
                loaded[part.encoder] = encoder_class.from_pretrained(src, subfolder=part.encoder, **te_kwargs)
            if "tokenizer" in components:
                tokenizer = CLIPTokenizer.from_pretrained(src, subfolder=part.tokenizer)
                loaded[part.tokenizer] = checked_tokenizer(tokenizer, f"{name} {part.tokenizer}/")
    except OSError as exc:
        raise ModelError(f"{name}: cannot load the model ({exc})") from exc
    scheduler_config["prediction_type"] = "v_prediction" if v else "epsilon"
    return SDModel(
        source=name,
        family=family,
        v_prediction=v,
        scheduler_config=scheduler_config,
        source_dtype=_folder_dtype(Path(src) / "unet"),
        **loaded,
    )


def local_copy(src: str, components: tuple[str, ...] = COMPONENTS) -> str:
    """A hub id's folders for `components`, from the local cache or downloaded once (see hub.py); a path as it is.

    Cheap (no torch): commands call it first, so a model that cannot be had fails before the heavy imports.
    """
    from sdtool.models import hub

    if not hub.is_hub_id(src):
        return src
    # The configs of scheduler, U-Net and text encoder are always read (detection); weights only where loaded.
    folders = {"": False, "scheduler": False, "unet": False, "text_encoder": False}
    folders.update({name: name != "tokenizer" for name in components})
    local = hub.local_model(src, what="the model", folders=folders)
    # A family with a second text encoder (SDXL) names it in its model_index.json.
    import json

    try:
        index = json.loads((local / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    second = {"text_encoder_2": "text_encoder" in components, "tokenizer_2": False}
    extra = {
        name: weights for name, weights in second.items() if name in index and (weights or "tokenizer" in components)
    }
    if extra:
        local = hub.local_model(src, what="the model", folders={**folders, **extra})
    return str(local)


def _folder_dtype(folder: Path) -> Any:
    """The float dtype of a local diffusers component's safetensors weights, read from the header only."""
    from safetensors import safe_open

    # The file diffusers loads without a `variant`: `diffusion_pytorch_model.fp16.safetensors` beside it is not it.
    files = sorted(folder.glob("*.safetensors"), key=lambda f: (f.name.count("."), f.name)) if folder.is_dir() else []
    if not files:
        return None
    counts: dict[Any, int] = {}
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                piece = f.get_slice(key)
                dtype_name = piece.get_dtype()
                size = 1
                for dim in piece.get_shape():
                    size *= dim
                counts[dtype_name] = counts.get(dtype_name, 0) + size
    except Exception:
        return None
    import torch

    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    floats = {names[k]: v for k, v in counts.items() if k in names}
    return max(floats, key=lambda d: floats[d]) if floats else None


def _text_config(src: str) -> dict[str, Any] | None:
    from transformers import CLIPTextConfig

    try:
        return CLIPTextConfig.from_pretrained(src, subfolder="text_encoder").to_dict()
    except OSError:
        return None


def prediction_from_metadata(metadata: dict[str, str]) -> bool | None:
    """v-prediction from modelspec metadata (`prediction_type`, else an architecture ending in `-v`); None: unknown."""
    kind = metadata.get("modelspec.prediction_type", "").strip().lower()
    if kind in ("v", "v_prediction", "v-prediction"):
        return True
    if kind == "epsilon":
        return False
    arch = metadata.get("modelspec.architecture", "")
    family = families.from_architecture(arch)
    return family.prediction_from_architecture(arch) if family is not None else None


def _load_single_file(
    path: Path,
    config: str | Path | None,
    model_type: ModelTypeArg,
    prediction: PredictionArg,
    allow_pickle: bool,
    dtype: Any,
    components: tuple[str, ...],
) -> SDModel:
    from sdtool.models import ldm_keys
    from sdtool.models.checkpoint import dominant_float_dtype, read_checkpoint
    from sdtool.models.families.sd1 import normalize_ldm_keys

    state_dict, metadata = read_checkpoint(path, allow_pickle=allow_pickle)
    state_dict = normalize_ldm_keys(state_dict)
    if not ldm_keys.has_component(state_dict, "unet"):
        raise ModelError(f"{path}: no U-Net weights ({ldm_keys.UNET_PREFIX}*): not an SD checkpoint in LDM layout")
    detected_v = prediction_from_metadata(metadata)
    if detected_v is None and V_PRED_MARKER in state_dict:
        detected_v = True  # ComfyUI's marker key (written by sdtool for SDXL too)
    config_dir: Path | None = None
    if config is not None:
        config_dir = Path(config)
        if not _is_diffusers_folder(config_dir):
            raise UsageError(f"{config}: not a diffusers folder (no model_index.json or unet/) to take configs from")
        if detected_v is None:
            detected_v = _scheduler_config(config_dir).get("prediction_type") == "v_prediction"
    detected = families.detect_ldm(state_dict)
    family, v = resolve_family(detected, detected_v, model_type, prediction, str(path))
    if config_dir is None:
        if detected is None and model_type == "auto":
            raise ModelError(
                f"{path}: cannot tell its model family (no text encoder, unusual cross-attention width)",
                hint="pass --model-type, or --config with the model's diffusers folder",
            )
        if family.prediction_matters and detected_v is None and prediction == "auto":
            warn(f"{path}: no prediction type recorded; assuming epsilon (pass --prediction v for a 768-v model)")
        config_dir = family.config_dir(v)
    scheduler_config = _scheduler_config(config_dir)
    scheduler_config["prediction_type"] = "v_prediction" if v else "epsilon"
    if ZTSNR_MARKER in state_dict:
        scheduler_config["rescale_betas_zero_snr"] = True

    loaded = _components_from_ldm(path, state_dict, config_dir, dtype, components, family, config is not None)
    return SDModel(
        source=str(path),
        family=family,
        v_prediction=v,
        scheduler_config=scheduler_config,
        ldm_extras=family.ldm_extras(state_dict, config_dir),
        source_metadata=metadata,
        source_dtype=dominant_float_dtype(state_dict),
        **loaded,
    )


def _json(path: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the config ({exc})") from exc


def _scheduler_config(config_dir: Path) -> dict[str, Any]:
    path = config_dir / "scheduler" / "scheduler_config.json"
    return _json(path) if path.is_file() else {}


def _conversion_errors() -> tuple[type[BaseException], ...]:
    """What diffusers' single-file conversion raises for weights that are not the model it was told to build.

    Besides the usual ValueError/KeyError of a state dict that does not fit, its own SingleFileComponentError (an
    Exception of its own) says a component's keys are missing, and shape inference on foreign tensors fails with
    IndexError or TypeError: each means "not this model", never an internal error of sdtool.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    return (ValueError, RuntimeError, KeyError, OSError, IndexError, TypeError, SingleFileComponentError)


def _components_from_ldm(
    path: Path,
    state_dict: dict[str, Any],
    config_dir: Path,
    dtype: Any,
    components: tuple[str, ...],
    family: ModelFamily,
    explicit: bool,
) -> dict[str, Any]:
    """Build the diffusers components from LDM weights with diffusers' single-file loaders."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    from sdtool.models import ldm_keys

    cfg = str(config_dir)
    where = f"the configs in {config_dir}" if explicit else f"the built-in {config_dir.name} configs"
    hint = "pass --config with a diffusers folder of the same architecture"
    loaded: dict[str, Any] = {}
    conversion_errors = _conversion_errors()
    try:
        if "unet" in components:
            unet_config = _json(config_dir / "unet" / "config.json")
            weights = ldm_keys.fit_projections(state_dict, linear=bool(unet_config.get("use_linear_projection")))
            loaded["unet"] = UNet2DConditionModel.from_single_file(
                weights, config=cfg, subfolder="unet", torch_dtype=dtype
            )
        if "vae" in components:
            if not ldm_keys.has_component(state_dict, "vae"):
                raise ModelError(f"{path}: holds no VAE ({ldm_keys.VAE_PREFIX}*)", hint="supply one with --vae")
            loaded["vae"] = AutoencoderKL.from_single_file(state_dict, config=cfg, subfolder="vae", torch_dtype=dtype)
        if "text_encoder" in components:
            if not family.has_text_encoder(state_dict):
                raise ModelError(f"{path}: holds no text encoder ({', '.join(family.text_encoder_prefixes)}*)")
            for part in family.text_parts:
                loaded[part.encoder] = create_diffusers_clip_model_from_ldm(
                    getattr(transformers, part.encoder_class),
                    state_dict,
                    subfolder=part.encoder,
                    config=cfg,
                    torch_dtype=dtype,
                )
    except ModelError:
        raise
    except conversion_errors as exc:
        raise ModelError(f"{path}: the weights do not fit {where} ({_first_line(exc)})", hint=hint) from exc
    for name, module in loaded.items():
        missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelError(f"{path}: {len(missing)} {name} weights missing for {where}, e.g. {missing[0]}", hint=hint)
    if "tokenizer" in components:
        for part in family.text_parts:
            loaded[part.tokenizer] = _tokenizer_for(config_dir, family, part, explicit)
    return loaded


def checked_tokenizer(tokenizer: Any, where: str) -> Any:
    """Refuse an empty tokenizer: transformers 5 returns one (2 tokens) instead of failing when files are missing."""
    if len(tokenizer) < 256:  # a byte-level BPE vocabulary has at least the 256 byte tokens
        raise OSError(f"no tokenizer files found for {where} (got an empty vocabulary)")
    return tokenizer


def _tokenizer_for(config_dir: Path, family: ModelFamily, part: TextPart, explicit: bool) -> Any:
    from transformers import CLIPTokenizer

    if explicit:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(config_dir), subfolder=part.tokenizer)
            return checked_tokenizer(tokenizer, f"{part.tokenizer}/")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config_dir}: no usable {part.tokenizer}/ ({_first_line(exc)})") from exc
    from sdtool.models import hub

    repo, subfolder = part.default_tokenizer
    local = hub.local_model(
        repo,
        what=f"the {family.title} tokenizer",
        folders={"": False, **({subfolder: False} if subfolder else {})},
        local_hint=f"pass --config DIR, a diffusers folder of the same model family with a {part.tokenizer}/ in it",
    )
    try:
        return checked_tokenizer(CLIPTokenizer.from_pretrained(str(local), subfolder=subfolder), repo)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"the {family.title} tokenizer ({repo}) is neither in the hub cache nor downloadable ({_first_line(exc)})",
            hint=f"pass --config DIR, a diffusers folder of the same model family with a {part.tokenizer}/ in it",
        ) from exc


def _first_line(exc: BaseException) -> str:
    """A short reason: diffusers' shape-mismatch errors shortened to the key and both shapes."""
    import re

    text = str(exc).strip()
    shape = re.search(r"(\S+) expected shape (.+?), but got (.+?)\. ", text)
    if shape:
        return f"{shape[1]} is {shape[3]} in the file but {shape[2]} in the config"
    return text.splitlines()[0] if text else type(exc).__name__
