"""The `--dry-run` memory estimate: what one training process keeps in accelerator memory, part by part, from the
model's configs (every part is built on the meta device, so nothing is loaded or downloaded beyond the configs).

What is counted, per part and per weight tensor:
- weights: the U-Net and the text encoders of the family (`family.text_parts`: SDXL's CLIPTextModel and
  CLIPTextModelWithProjection) and the VAE, each in the dtype `precision` gives it. A text encoder whose outputs
  are cached (`cache_text_encoder_outputs`) is assumed off the accelerator during the steps (kohya moves both to
  the CPU once the outputs are cached, bringing them back only for samples); a VAE is not loaded for training
  when latents are cached (sampling loads one on the CPU).
- what trains: the U-Net (less the `block_lr` blocks at rate 0, which the optimizer never sees), each text encoder
  at its own rate (less the modules whose output nothing reads), or a hypernetwork on a frozen U-Net. The same
  functions as the recipe decide it (`optim.unet_param_groups`, `precision.text_encoder_rates`,
  `family.unused_text_modules`).
- gradients: one per trained weight in its dtype; with `fused_backward_pass` each weight takes its optimizer step
  as soon as its gradient is complete and drops it, so only the largest gradient is counted.
- optimizer state, per tensor as each library allocates it: AdamW two moments in the weight's dtype; bitsandbytes'
  8-bit AdamW one byte per moment plus an fp32 scale per 256 values (fp32 moments below 4096 values); Lion and
  SGD one buffer; Prodigy four (two of them thinned by `slice_p`); Adafactor (transformers) fp32 factored second
  moments for every tensor of two or more dimensions — a row of shape[:-1] and a column of shape[:-2]+shape[-1:]
  — a full one for the rest, and a first moment only with `beta1`.
- optimizer step scratch, which exists only during the step, after backward: torch's AdamW (foreach, its default
  on CUDA) takes a full copy of the second moments for their square root; Adafactor, Lion and Prodigy work one
  tensor at a time (two fp32 copies of the largest tensor for Adafactor, four for half-precision weights).
- an EMA of the trained weights (fp32), unless it is offloaded to the CPU; DDP's gradient buckets (a second copy of
  the gradients) when several processes train.

Not counted: activations (they depend on the resolution, the batch, gradient checkpointing and the attention
kernel: `benchmarks/bench_unet_gpu.py` measures the peak for SD1.5 and SDXL U-Nets), the CUDA context, allocator
fragmentation and kernel workspaces, and the batch itself. The estimate is a floor for the peak, not the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.train.config.schema import ResolvedConfig

GIB = float(1 << 30)
# bitsandbytes' blockwise 8-bit state: one fp32 absmax per block, and fp32 states for small tensors
# (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state: blocksize = 256, min_8bit_size = 4096).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
ACTIVATIONS_NOTE = (
    "activations not included: they depend on the resolution, batch size, gradient checkpointing and attention "
    "kernel (benchmarks/bench_unet_gpu.py measures the peak on a GPU)"
)


@dataclass
class MemoryRow:
    """One part of the estimate: its bytes and how they were counted."""

    name: str
    bytes: int
    how: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class MemoryEstimate:
    """Accelerator memory of one training process, before activations."""

    rows: list[MemoryRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # parameter counts: every part's total, and what trains
    params: dict[str, int] = field(default_factory=dict)
    trained: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    def row(self, name: str) -> MemoryRow:
        """The row called `name` (KeyError if there is none)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def lines(self) -> list[str]:
        """What `--dry-run` prints: the total, a line per part, then the assumptions and what is left out."""
        out = [f"memory estimate: {_size(self.total_bytes)} per process before activations"]
        out += [f"  {row.name}: {_size(row.bytes)} ({row.how})" for row in self.rows]
        out += [f"  {note}" for note in self.notes]
        return out


@dataclass
class _Models:
    family: Any
    unet: Any
    vae: Any
    text_encoders: list[Any]


def estimate_memory(cfg: ResolvedConfig, processes: int = 1) -> MemoryEstimate:
    """The estimate for `cfg`; raises OSError/ValueError when the model's configs cannot be read."""
    from sdtool.train.optim import parse_optimizer_args
    from sdtool.train.precision import compute_bytes, master_bytes

    t = cfg.train
    models = _meta_models(cfg)
    family = models.family
    half, master = compute_bytes(t), master_bytes(t)
    est = MemoryEstimate()
    est.params = {"unet": _numel(models.unet.parameters()), "vae": _numel(models.vae.parameters())}
    for part, te in zip(family.text_parts, models.text_encoders, strict=True):
        est.params[part.encoder] = _numel(te.parameters())

    trained = _unet_rows(cfg, models, est, half, master) + _text_encoder_rows(cfg, models, est, half, master)
    est.rows.append(_vae_row(cfg, models, est.params["vae"], half))

    n_trained = _numel(trained)
    largest = max((p.numel() for p in trained), default=0)
    kind = _dtype(master, t)
    if t.fused_backward_pass:
        how = f"fused backward pass: one weight's at a time, {_m(largest)}"
        est.rows.append(MemoryRow("gradients", largest * master, how))
    else:
        est.rows.append(MemoryRow("gradients", n_trained * master, f"{_m(n_trained)} trained weights, {kind}"))
    args = parse_optimizer_args(t.optimizer_args)
    state = sum(optimizer_state_bytes(t.optimizer_type, args, tuple(p.shape), master) for p in trained)
    est.rows.append(MemoryRow("optimizer state", state, _state_how(t.optimizer_type, args)))
    scratch, how = step_scratch_bytes(t.optimizer_type, args, n_trained, largest, master)
    est.rows.append(MemoryRow("optimizer step scratch", scratch, how))

    if t.use_ema and t.offload_ema:
        est.notes.append("EMA: kept on the CPU (offload_ema)")
    elif t.use_ema:
        est.rows.append(MemoryRow("EMA", n_trained * 4, "fp32 copy of the trained weights"))
    if processes > 1 and not t.fused_backward_pass:
        how = f"{processes} processes, each holds a second copy of the gradients"
        est.rows.append(MemoryRow("DDP gradient buckets", n_trained * master, how))
    if t.optimizer_type not in _KNOWN_OPTIMIZERS:
        est.notes.append(f"{t.optimizer_type}: state and step scratch not known; counted as AdamW's")
    est.notes.append(ACTIVATIONS_NOTE)
    return est


def _unet_rows(cfg: ResolvedConfig, models: _Models, est: MemoryEstimate, half: int, master: int) -> list[Any]:
    """The U-Net's row (and the hypernetwork's); returns the weights that train."""
    from sdtool.train.config.family_checks import block_lrs
    from sdtool.train.optim import unet_param_groups

    t, n = cfg.train, est.params["unet"]
    if t.train_hypernetwork:
        trained = list(_meta_hypernetwork(cfg, models.unet).parameters())
        est.trained["hypernetwork"] = _numel(trained)
        est.rows.append(MemoryRow("U-Net", n * half, f"{_m(n)} weights, {_dtype(half, t)}, frozen"))
        n_hyper = est.trained["hypernetwork"]
        how = f"{_m(n_hyper)} weights, {_dtype(master, t)}, trained"
        est.rows.append(MemoryRow("hypernetwork", n_hyper * master, how))
        return trained
    models.unet.requires_grad_(True)
    groups, _ = unet_param_groups(models.unet, t.learning_rate, block_lrs(t.block_lr, models.family.block_lr_blocks))
    trained = [p for group in groups for p in group["params"]]
    est.trained["unet"] = _numel(trained)
    how = f"{_m(n)} weights, {_dtype(master, t)}, trained"
    if est.trained["unet"] < n:
        how += f"; block_lr: {_m(n - est.trained['unet'])} in blocks at rate 0 stay frozen"
    est.rows.append(MemoryRow("U-Net", n * master, how))
    return trained


def _text_encoder_rows(cfg: ResolvedConfig, models: _Models, est: MemoryEstimate, half: int, master: int) -> list[Any]:
    """A row per text encoder of the family; returns the weights that train."""
    from sdtool.train.precision import text_encoder_rates

    t, family = cfg.train, models.family
    rates = text_encoder_rates(t, family)
    for te, rate in zip(models.text_encoders, rates, strict=True):
        te.requires_grad_(rate is not None)
    for module in family.unused_text_modules(models.text_encoders, t.clip_skip):
        module.requires_grad_(False)
    trained: list[Any] = []
    for part, te, rate in zip(family.text_parts, models.text_encoders, rates, strict=True):
        n = est.params[part.encoder]
        name = f"{part.encoder} ({part.encoder_class})"
        if rate is not None:
            params = [p for p in te.parameters() if p.requires_grad]
            trained += params
            est.trained[part.encoder] = _numel(params)
            how = f"{_m(n)} weights, {_dtype(master, t)}, trained at {rate:g}"
            if est.trained[part.encoder] < n:
                how += f"; {_m(n - est.trained[part.encoder])} that no conditioning reads stay frozen"
            est.rows.append(MemoryRow(name, n * master, how))
        elif t.cache_text_encoder_outputs:
            est.rows.append(MemoryRow(name, 0, f"{_m(n)} weights; outputs cached, kept off the accelerator"))
        else:
            est.rows.append(MemoryRow(name, n * half, f"{_m(n)} weights, {_dtype(half, t)}, frozen"))
    return trained


def _vae_row(cfg: ResolvedConfig, models: _Models, n: int, half: int) -> MemoryRow:
    from sdtool.train.precision import vae_in_fp32

    t = cfg.train
    if t.cache_latents and t.vae is None:  # the recipe loads an explicit `vae` even with cached latents
        return MemoryRow("VAE", 0, "latents cached: not loaded for training")
    nbytes = 4 if vae_in_fp32(t, models.family, models.vae.config.get("force_upcast")) else half
    return MemoryRow("VAE", n * nbytes, f"{_m(n)} weights, {_dtype(nbytes, t)}")


# ------------------------------------------------------------------------------------------------ the optimizers
_KNOWN_OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "SGDNesterov", "Adafactor", "Prodigy")


def optimizer_state_bytes(name: str, args: dict[str, Any], shape: tuple[int, ...], weight_bytes: int) -> int:
    """Bytes of optimizer state the optimizer `name` (kohya's names) keeps for one weight tensor of `shape`."""
    n = math.prod(shape)
    if name in ("AdamW8bit", "PagedAdamW8bit"):
        if n < int(args.get("min_8bit_size", BNB_MIN_8BIT_SIZE)):
            return 2 * 4 * n
        return 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    if name in ("Lion", "SGDNesterov"):
        return n * weight_bytes
    if name == "Adafactor":
        first = 4 * n if args.get("beta1") is not None else 0
        if len(shape) >= 2:
            return first + 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
        return first + 4 * n
    if name == "Prodigy":
        sliced = math.ceil(n / int(args.get("slice_p", 1)))
        betas = args.get("betas", (0.9, 0.999))
        moments = 2 if betas[0] > 0 else 1
        return (moments * n + 2 * sliced) * weight_bytes
    return 2 * n * weight_bytes  # AdamW, and what a custom optimizer is taken to need


def step_scratch_bytes(
    name: str, args: dict[str, Any], n_trained: int, largest: int, weight_bytes: int
) -> tuple[int, str]:
    """Temporary memory of one optimizer step (after backward, when activations are gone) and how it arises."""
    if name == "Adafactor":
        copies = 2 + (2 if weight_bytes < 4 else 0)
        return copies * 4 * largest, f"{copies} fp32 copies of the largest tensor ({_m(largest)})"
    if name in ("Lion", "Prodigy"):
        return largest * weight_bytes, f"one copy of the largest tensor ({_m(largest)})"
    if name in ("AdamW8bit", "PagedAdamW8bit"):
        return 0, "in-place 8-bit kernels"
    if name == "SGDNesterov":
        if args.get("weight_decay", 0):
            return n_trained * weight_bytes, "foreach weight decay copies every gradient"
        return 0, "in place"
    if args.get("fused"):
        return 0, "fused kernel"
    if args.get("foreach") is False:
        return largest * weight_bytes, f"one tensor at a time ({_m(largest)})"
    return n_trained * weight_bytes, "torch's foreach AdamW copies every second moment for its square root"


def _state_how(name: str, args: dict[str, Any]) -> str:
    return {
        "AdamW": "two moments per weight",
        "AdamW8bit": "two 8-bit moments per weight, fp32 scale per 256",
        "PagedAdamW8bit": "two 8-bit moments per weight, fp32 scale per 256, paged (may move to the CPU)",
        "Lion": "one moment per weight",
        "SGDNesterov": "one momentum buffer per weight",
        "Adafactor": "fp32 factored second moments" + (", fp32 first moment (beta1)" if args.get("beta1") else ""),
        "Prodigy": "two moments, s and p0 per weight",
    }.get(name, "assumed two moments per weight")


# ------------------------------------------------------------------------------------------------ the model
def _meta_models(cfg: ResolvedConfig) -> _Models:
    """The model's U-Net, VAE and text encoders on the meta device, from its configs (or the family's shipped ones
    for a single file)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sdtool.models import families, hub
    from sdtool.models.loading import resolve_family

    t = cfg.train
    src = t.pretrained_model_name_or_path
    family = cfg.family
    where = src
    if hub.is_hub_id(src):  # the configs only, from the local cache (or downloaded once)
        where = _hub_configs(src)
    elif Path(src).is_file():
        if family is None:
            raise ValueError(f"{src}: the model family of a pickled single file is known only once it loads")
        where = str(family.config_dir(False))  # epsilon and v-prediction configs differ in no weight
    unet_config = UNet2DConditionModel.load_config(where, subfolder="unet")
    if family is None:
        text = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder").to_dict()
        family, _ = resolve_family(families.detect_configs(unet_config, text), None)  # as a hub model loads
    vae_config = _vae_config(t.vae) or AutoencoderKL.load_config(where, subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        encoders = [
            getattr(transformers, part.encoder_class)(CLIPTextConfig.from_pretrained(where, subfolder=part.encoder))
            for part in family.text_parts
        ]
    return _Models(family, unet, vae, encoders)


def _hub_configs(repo_id: str) -> str:
    """The local snapshot of a hub model with the configs the estimate reads (U-Net, VAE, every text encoder its
    model_index.json names), no weights."""
    import json

    from sdtool.models import families, hub

    configs = {"": False, "unet": False, "vae": False, "text_encoder": False}
    local = hub.local_model(repo_id, what="the model", folders=configs)
    try:
        index = json.loads((local / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    parts = {part.encoder for name in families.NAMES for part in families.by_name(name).text_parts}
    extra = {encoder: False for encoder in parts if encoder in index and encoder not in configs}
    if extra:
        local = hub.local_model(repo_id, what="the model", folders={**configs, **extra})
    return str(local)


def _vae_config(vae: str | None) -> dict[str, Any] | None:
    """A separate VAE's config when it is a diffusers folder (a single-file VAE has the model's architecture)."""
    if vae is None or not Path(vae).is_dir():
        return None
    from diffusers import AutoencoderKL

    folder = Path(vae)
    return dict(AutoencoderKL.load_config(str(folder), subfolder=None if (folder / "config.json").is_file() else "vae"))


def _meta_hypernetwork(cfg: ResolvedConfig, unet: Any) -> Any:
    from accelerate import init_empty_weights

    from sdtool.train.hypernetwork.attention import context_widths
    from sdtool.train.hypernetwork.network import Hypernetwork

    t = cfg.train
    with init_empty_weights():
        return Hypernetwork(
            context_widths(unet),
            t.hypernetwork_layer_structure,
            t.hypernetwork_activation,
            t.hypernetwork_layer_norm,
            t.hypernetwork_dropout,
        )


def _numel(params: Any) -> int:
    return sum(p.numel() for p in params)


def _size(nbytes: int) -> str:
    if nbytes == 0:
        return "0"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def _m(n: int) -> str:
    """A parameter count for people: 2,567.5 M."""
    return f"{n / 1e6:,.1f} M" if n >= 100_000 else f"{n:,}"


def _dtype(nbytes: int, t: Any) -> str:
    return "fp32" if nbytes == 4 else str(t.mixed_precision)
