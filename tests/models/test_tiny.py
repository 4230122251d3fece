"""The tiny SD-shaped test models load through diffusers like real SD folders."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_tiny_model_loads_and_has_sd_shape(request, kind):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = request.getfixturevalue(f"tiny_{kind}")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")

    assert len(unet.down_blocks) == 4 and len(vae.encoder.down_blocks) == 4
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert unet.config.use_linear_projection is (kind == "v2")
    ids = tok("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0].item() == tok.bos_token_id
    expected_pad = tok.eos_token_id if kind == "v1" else tok.convert_tokens_to_ids("!")
    assert tok.pad_token_id == expected_pad and ids[0, -1].item() == expected_pad
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        states = te(ids).last_hidden_state
        out = unet(latents, torch.tensor([10]), encoder_hidden_states=states).sample
    assert latents.shape == (1, 4, 8, 8) and out.shape == latents.shape
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("epsilon" if kind == "v1" else "v_prediction")
