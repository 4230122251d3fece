"""The diffusers → LDM key tables, checked at full SD1.5 / SD2 size against diffusers' own LDM → diffusers converter.

The models are built on the meta device (no memory, no weights): only names and shapes matter here.
"""

from __future__ import annotations

import json

import pytest

from sdtool.errors import ModelError
from sdtool.models import ldm_keys
from sdtool.models.families import sd1, sd2
from sdtool.models.families.base import CONFIGS_DIR


def _config(name: str, part: str) -> dict:
    return json.loads((CONFIGS_DIR / name / part / "config.json").read_text())


def _meta_unet(name: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(_config(name, "unet"))


@pytest.mark.parametrize("name", ["sd15", "sd2-768-v"])
def test_unet_map_inverts_diffusers_converter_at_full_size(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    unet = _meta_unet(name)
    v2 = name != "sd15"
    ldm = ldm_keys.unet_to_ldm(unet.state_dict(), unet.config)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    # The real SD1.5/SD2 files have 686 U-Net tensors with these names.
    assert len(ldm) == 686
    for key in (
        "input_blocks.3.0.op.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "middle_block.1.proj_in.weight",
        "output_blocks.11.0.skip_connection.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    ):
        assert "model.diffusion_model." + key in ldm
    proj = ldm["model.diffusion_model.middle_block.1.proj_in.weight"]
    assert proj.ndim == (2 if v2 else 4)  # SD2 stores linear projections, SD1 1×1 convs
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert back.keys() == unet.state_dict().keys()
    assert infer_diffusers_model_type(ldm) == ("v2" if v2 else "v1")


def test_vae_map_inverts_diffusers_converter_at_full_size():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with init_empty_weights():
        vae = AutoencoderKL.from_config(_config("sd15", "vae"))
    ldm = ldm_keys.vae_to_ldm(vae.state_dict(), vae.config)
    assert len(ldm) == 248  # as in the real SD files
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    # Decoder levels are reversed: diffusers' first up block (512 wide) is LDM's up.3.
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm
    back = convert_ldm_vae_checkpoint(ldm, vae.config)
    assert back.keys() == vae.state_dict().keys()


def test_openclip_map_for_sd2_shape():
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        te = CLIPTextModel(CLIPTextConfig(**_config("sd2-768-v", "text_encoder")))
    ldm = sd2.openclip_to_ldm(te.state_dict())
    p = sd2.OPENCLIP_PREFIX
    # OpenCLIP-H has 24 blocks, 12 tensors each, plus embeddings, ln_final, text_projection and logit_scale.
    assert len(ldm) == 24 * 12 + 6
    assert ldm[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    assert p + "transformer.resblocks.23.mlp.c_proj.weight" in ldm
    assert ldm[p + "text_projection"].shape == (1024, 1024)
    assert ldm[p + "positional_embedding"].shape == (77, 1024)


def test_clip_map_accepts_both_transformers_layouts():
    import torch

    flat = {"embeddings.token_embedding.weight": torch.zeros(2), "final_layer_norm.bias": torch.zeros(1)}
    nested = {"text_model." + k: v for k, v in flat.items()}
    assert sd1.clip_to_ldm(flat).keys() == sd1.clip_to_ldm(nested).keys()
    assert set(sd1.clip_to_ldm(flat)) == {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    }


def test_unknown_weight_is_an_error():
    import torch

    unet = _meta_unet("sd15")
    sd = dict(unet.state_dict())
    sd["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match="class_embedding"):
        ldm_keys.unet_to_ldm(sd, unet.config)


def test_old_text_encoder_layout_is_normalised():
    out = sd1.normalize_ldm_keys({"cond_stage_model.transformer.encoder.layers.0.mlp.fc1.bias": 1})
    assert out == {"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias": 1}


def test_detect_v2_from_ldm_keys():
    import torch

    assert sd2.detect_ldm({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}) is True
    assert sd2.detect_ldm({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}) is False
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert sd2.detect_ldm({k: torch.zeros(320, 1024)}) is True
    assert sd2.detect_ldm({k: torch.zeros(320, 768)}) is False
    assert sd2.detect_ldm({k: torch.zeros(32, 32)}) is None
