"""SDXL 1.0 (base and derivatives): two text encoders, CLIP ViT-L (`conditioner.embedders.0.transformer.`) and
OpenCLIP ViT-bigG with projection (`conditioner.embedders.1.model.`), 2048-wide cross-attention, and
micro-conditioning (`add_embedding`, `label_emb` in LDM files) on the pooled text embedding and six size numbers.

Text encoding follows kohya's `sdxl_train` (strategy_sdxl.py), which is SGM's: both encoders' penultimate hidden
states without a final layer norm, concatenated to 768 + 1280; the pooled embedding is OpenCLIP's final-layer-norm
state at the first EOS, through `text_projection`; with 150/225 tokens each 77-id chunk is encoded on its own,
reassembled as for SD1/2, and the pooled embedding comes from the first chunk. The second tokenizer pads with "!"
(id 0, OpenCLIP's zero padding), so its chunks get the EOS fix SD2 chunks get.

Differences from kohya, on purpose: `text_projection` is transposed between LDM files and transformers (diffusers
and SGM do this; kohya copies it as is, so its pooled embedding differs for a model read from a single file);
`clip_skip` other than 2 (the penultimate layer SDXL always uses) is refused instead of ignored with a warning.

v-prediction SDXL files carry no modelspec name of their own: they are recognised by `modelspec.prediction_type`,
or ComfyUI's marker keys `v_pred` (and `ztsnr` for zero terminal SNR), which sdtool also writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sdtool.errors import ModelError
from sdtool.models import ldm_keys
from sdtool.models.families import openclip
from sdtool.models.families.base import ModelFamily, TextConditioning, TextPart

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_L_TEXT_PREFIX = CLIP_L_PREFIX + "text_model."
OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."
# ComfyUI's markers in a single file: v-prediction, and a zero-terminal-SNR schedule.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
_REPO = "stabilityai/stable-diffusion-xl-base-1.0"


class SDXLFamily(ModelFamily):
    name = "sdxl"
    title = "SDXL"
    text_encoder_prefixes = (CLIP_L_PREFIX, OPENCLIP_G_PREFIX)
    linear_projection = True
    text_parts = (
        TextPart("text_encoder", "tokenizer", "CLIPTextModel", (_REPO, "tokenizer"), "learning_rate_te1"),
        TextPart(
            "text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", (_REPO, "tokenizer_2"), "learning_rate_te2"
        ),
    )
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_options: ClassVar[dict[str, Any]] = {"add_watermarker": False}
    architectures: ClassVar[dict[bool, str]] = {
        False: "stable-diffusion-xl-v1-base",
        True: "stable-diffusion-xl-v1-base",
    }
    config_names: ClassVar[dict[bool, str]] = {False: "sdxl-base", True: "sdxl-base"}
    resolutions: ClassVar[dict[bool, int]] = {False: 1024, True: 1024}
    # 1024², buckets 512-2048 (kohya has no SDXL defaults; its generic 256-1024 caps every non-square bucket at 1024)
    dataset_defaults: ClassVar[dict[str, Any]] = {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048}
    block_lr_blocks = 23  # time/label embedding, input blocks 0-8, middle 0-2, output 0-8, out (kohya's sdxl_train)
    supports_hypernetworks = False
    needs_original_size = True
    vae_overflows_in_fp16 = True

    def has_text_encoder(self, state_dict: Mapping[str, Any]) -> bool:
        # Both towers: SDXL conditions on the two together.
        return all(any(key.startswith(p) for key in state_dict) for p in self.text_encoder_prefixes)

    def text_encoders_to_ldm(self, encoders: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        clip_l, clip_g = encoders.get("text_encoder"), encoders.get("text_encoder_2")
        if clip_l is not None:
            flat = ldm_keys.flat_text_keys(clip_l.state_dict())
            out.update({CLIP_L_TEXT_PREFIX + key: value for key, value in flat.items()})
        if clip_g is not None:
            out.update(openclip.openclip_to_ldm(clip_g.state_dict(), OPENCLIP_G_PREFIX, extras))
        return out

    def ldm_extras(self, state_dict: Mapping[str, Any], config_dir: Path) -> dict[str, Any]:
        layers = openclip.saved_layer_count(config_dir, "text_encoder_2", "the second text encoder")
        return openclip.openclip_extras(state_dict, OPENCLIP_G_PREFIX, layers, keep_projection=False)

    def ldm_markers(self, v_prediction: bool, zero_terminal_snr: bool) -> dict[str, Any]:
        import torch

        markers = {}
        if v_prediction:
            markers[V_PRED_MARKER] = torch.tensor([])
            if zero_terminal_snr:
                markers[ZTSNR_MARKER] = torch.tensor([])
        return markers

    def unused_text_modules(self, text_encoders: Sequence[Any], clip_skip: int | None) -> list[Any]:
        # CLIP-L conditions through its penultimate layer only; OpenCLIP's last layer and final norm feed the
        # pooled embedding, so they stay (kohya freezes the same two modules of text encoder 1).
        clip_l = text_encoders[0]
        return [clip_l.encoder.layers[-1], clip_l.final_layer_norm]

    def check_clip_skip(self, clip_skip: int | None) -> str | None:
        if clip_skip in (None, 2):
            return None
        return (
            f"clip_skip = {clip_skip} does not apply to SDXL, which always conditions on the penultimate layer of both "
            "text encoders (what clip_skip = 2 means); remove clip_skip (kohya ignores it with a warning)"
        )

    def encode_ids(self, text_encoders: Sequence[Any], ids: Sequence[Any], clip_skip: int | None) -> TextConditioning:
        return encode_sdxl(text_encoders[0], text_encoders[1], ids[0], ids[1], eos_token_id(text_encoders[1]))

    def unet_inputs(self, conditioning: TextConditioning, time_ids: Any = None) -> dict[str, Any]:
        if time_ids is None:
            raise ModelError("SDXL needs the size conditioning (original size, crop, target size) of every image")
        hidden = conditioning.hidden
        added = {"text_embeds": conditioning.pooled.to(hidden.dtype), "time_ids": time_ids.to(hidden.device)}
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}


SDXL = SDXLFamily()


def detect_ldm(state_dict: Mapping[str, Any]) -> bool:
    """Whether LDM weights are SDXL's: its text towers, or a U-Net with the `label_emb` micro-conditioning."""
    return any(key.startswith(("conditioner.embedders.", ldm_keys.UNET_PREFIX + "label_emb.")) for key in state_dict)


def detect_configs(unet_config: Mapping[str, Any] | None) -> bool:
    """Whether a diffusers U-Net config is SDXL's (the `text_time` addition embedding)."""
    return unet_config is not None and unet_config.get("addition_embed_type") == "text_time"


def eos_token_id(text_encoder: Any) -> int:
    """CLIP's end-of-text id. SDXL's released configs carry a legacy `eos_token_id: 2`; the real token is the last
    of the vocabulary (49407), which is what transformers' own pooling falls back to for that legacy value."""
    eos = int(text_encoder.config.eos_token_id)
    return int(text_encoder.config.vocab_size) - 1 if eos == 2 else eos


def encode_sdxl(te1: Any, te2: Any, ids1: Any, ids2: Any, eos: int) -> TextConditioning:
    """(B, n, 77) ids of both tokenizers → hidden (B, 2 + 75n, D1 + D2) and pooled (B, P), as kohya encodes them."""
    import torch

    from sdtool.text import reassemble_chunks

    b, n, length = ids1.shape
    flat1 = ids1.reshape(b * n, length).to(te1.device)
    flat2 = ids2.reshape(b * n, length).to(te2.device)
    hidden1 = te1(flat1, output_hidden_states=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    # The pooled state is the final-layer-norm output at the first EOS (kohya's pool_workaround), projected.
    last = out2.last_hidden_state
    index = torch.argmax((flat2 == eos).int(), dim=1).to(last.device)
    pooled = last[torch.arange(last.shape[0], device=last.device), index]
    projection = te2.text_projection
    pooled = projection(pooled.to(projection.weight.dtype)).to(last.dtype)
    hidden = torch.cat([reassemble_chunks(hidden1, b, n), reassemble_chunks(hidden2.to(hidden1.device), b, n)], dim=-1)
    # With several chunks, the first chunk's pooled embedding stands for the prompt (kohya: pool2[::n]).
    return TextConditioning(hidden, pooled.reshape(b, n, -1)[:, 0].to(hidden.device))
