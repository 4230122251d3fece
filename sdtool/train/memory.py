"""The `--dry-run` memory estimate: weights, gradients and optimizer state of what trains, from the model's configs
(built on the meta device, so nothing is loaded).
"""

from __future__ import annotations

from sdtool.train.config.schema import ResolvedConfig


def estimate_memory(cfg: ResolvedConfig) -> dict[str, float]:
    """A rough GiB estimate of weights, gradients and optimizer state (activations come on top)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtool.models import hub

    src = cfg.train.pretrained_model_name_or_path
    if hub.is_hub_id(src):  # the configs only, from the local cache (or downloaded once)
        configs = {"": False, "unet": False, "vae": False, "text_encoder": False}
        src = str(hub.local_model(src, what="the model", folders=configs))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(src, subfolder="text_encoder"))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("te", te))}
    t = cfg.train
    half = 2 if t.mixed_precision != "no" else 4
    master = half if (t.full_fp16 or t.full_bf16) else 4
    state_bytes = {"AdamW": 8, "AdamW8bit": 2, "PagedAdamW8bit": 2, "Lion": 4, "SGDNesterov": 4, "Prodigy": 16}
    per_param_state = state_bytes.get(t.optimizer_type, 8) * (master / 4)
    trained = count["unet"] + (count["te"] if t.train_text_encoder else 0)
    frozen = count["vae"] * (4 if t.no_half_vae else half) + (0 if t.train_text_encoder else count["te"] * half)
    if t.train_hypernetwork:
        from sdtool.train.hypernetwork.attention import context_widths
        from sdtool.train.hypernetwork.network import Hypernetwork

        with init_empty_weights():
            hypernetwork = Hypernetwork(
                context_widths(unet),
                t.hypernetwork_layer_structure,
                t.hypernetwork_activation,
                t.hypernetwork_layer_norm,
                t.hypernetwork_dropout,
            )
        trained = sum(p.numel() for p in hypernetwork.parameters())
        frozen += count["unet"] * half
    gib = float(1 << 30)
    out = {
        "trained weights": trained * master / gib,
        "gradients": trained * master / gib,
        "optimizer state": trained * per_param_state / gib,
        "frozen weights": frozen / gib,
    }
    out["total (without activations)"] = sum(out.values())
    return out
