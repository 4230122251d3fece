"""Tiny SD-shaped models built offline from configs, for tests and `sdtool demo`.

They have SD's structure (four U-Net and VAE blocks, cross-attention in the first three U-Net levels, a CLIP text
encoder and a BPE tokenizer) at a size that trains on a CPU in seconds. `v1` pads with EOS and predicts epsilon
like SD 1.x; `v2` uses linear projections, gelu, "!" padding and v-prediction like SD 2.x-768-v. `sdxl` has
SDXL's layout: three U-Net levels (no attention in the first, transformer depths 1/2/2 for SDXL's 1/2/10), the
`text_time` micro-conditioning, a CLIP-L-like and an OpenCLIP-like text encoder with projection ("!" padding for
the second), the SDXL VAE scaling factor and an Euler scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

TinyKind = Literal["v1", "v2", "sdxl"]

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters (still valid BPE).
_WORDS = (
    "a photo of cat dog girl boy man woman red blue green white black yellow sky tree house car "
    "flower sitting standing on in the with and painting drawing portrait landscape solo 1girl 1boy "
    "long short hair eyes smile looking at viewer outdoors indoors day night simple background "
    "highres best quality masterpiece picture small large tall wide square image sdtool demo circle "
    "stripes gradient"
).split()

TINY_TEXT_WIDTH = 32

# What sets each tiny family apart, as its real models do (read by the builders below, one row per kind).
_KINDS: dict[str, dict[str, Any]] = {
    "v1": {
        "pad_token": "<|endoftext|>",
        "attention_head_dim": 2,
        "linear_projection": False,
        "hidden_act": "quick_gelu",
        "scheduler": (
            "PNDMScheduler",
            {"skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon"},
        ),
    },
    "v2": {
        "pad_token": "!",
        "attention_head_dim": (2, 2, 4, 4),
        "linear_projection": True,
        "hidden_act": "gelu",
        "scheduler": (
            "DDIMScheduler",
            {"clip_sample": False, "set_alpha_to_one": False, "prediction_type": "v_prediction"},
        ),
    },
    "sdxl": {
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
        "sdxl_layout": True,
        "attention_head_dim": (2, 4, 4),
        "linear_projection": True,
        "hidden_act": "quick_gelu",
        "scheduler": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "prediction_type": "epsilon"}),
    },
}
# SDXL's micro-conditioning: six size numbers, each embedded in this many dimensions (256 in SDXL).
TINY_TIME_EMBED = 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary: all bytes, bytes + '</w>', merges for `_WORDS`, specials last."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in _WORDS:
        pieces = list(word)
        pieces[-1] += "</w>"
        current = pieces[0]
        for nxt in pieces[1:]:
            merged = current + nxt
            if merged not in known:
                merges.append((current, nxt))
                tokens.append(merged)
                known.add(merged)
            current = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_tokenizer(kind: TinyKind = "v1", second: bool = False) -> Any:
    """The tiny tokenizer of `kind` (`second`: SDXL's second tokenizer, which pads with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tuples, as tokenizers wants
        pad_token=_KINDS[kind]["pad_token_2" if second else "pad_token"],
        model_max_length=77,
    )


def tiny_configs(kind: TinyKind = "v1") -> dict[str, dict[str, Any]]:
    """Configs of the tiny U-Net, VAE and text encoder (plain dicts so they can be inspected and saved)."""
    vocab, _ = tiny_vocab_and_merges()
    row = _KINDS[kind]
    unet = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=row["attention_head_dim"],
        use_linear_projection=row["linear_projection"],
        upcast_attention=row["linear_projection"],
        norm_num_groups=32,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=row["hidden_act"],
        projection_dim=TINY_TEXT_WIDTH,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab[row["pad_token"]],
    )
    configs = {"unet": unet, "vae": vae, "text_encoder": text}
    if row.get("sdxl_layout"):
        _sdxl_configs(configs, vocab)
    return configs


def _sdxl_configs(configs: dict[str, dict[str, Any]], vocab: dict[str, int]) -> None:
    """SDXL's layout at tiny widths: the second text encoder, the U-Net's levels and micro-conditioning."""
    # Wider than the first, as bigG is wider than ViT-L (diffusers tells SDXL's two towers apart by width).
    width2 = TINY_TEXT_WIDTH + 16
    text2 = {
        **configs["text_encoder"],
        "hidden_size": width2,
        "intermediate_size": 2 * width2,
        "projection_dim": width2,
        "hidden_act": "gelu",
        "pad_token_id": vocab["!"],
    }
    configs["text_encoder_2"] = text2
    configs["unet"].update(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=TINY_TEXT_WIDTH + width2,
        upcast_attention=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=text2["projection_dim"] + 6 * TINY_TIME_EMBED,
    )
    configs["vae"].update(scaling_factor=0.13025, force_upcast=True)


def build_tiny_pipeline(kind: TinyKind = "v1", seed: int = 0) -> Any:
    """A pipeline of the family's diffusers class with tiny components and fixed-seed random weights."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtool.models.families import by_name

    configs = tiny_configs(kind)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    schedule = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    scheduler_class, scheduler_options = _KINDS[kind]["scheduler"]
    scheduler = getattr(diffusers, scheduler_class)(**schedule, **scheduler_options)
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": build_tiny_tokenizer(kind),
        "unet": unet,
        "scheduler": scheduler,
    }
    if "text_encoder_2" in configs:
        torch.manual_seed(seed + 3)
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        components["tokenizer_2"] = build_tiny_tokenizer(kind, second=True)
    family = by_name(kind)
    return getattr(diffusers, family.pipeline_class)(**components, **family.pipeline_options)


def save_tiny_model(path: str | Path, kind: TinyKind = "v1", seed: int = 0) -> Path:
    """Write a tiny diffusers folder of `kind` (safetensors weights) and return its path."""
    path = Path(path)
    pipe = build_tiny_pipeline(kind, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
