"""Loading diffusers folders and detecting v1/v2 and the prediction type."""

from __future__ import annotations

import pytest

from sdtool.errors import ModelError, UsageError
from sdtool.models.loading import load_model
from sdtool.models.vae import load_vae


def test_v1_detected(tiny_v1):
    m = load_model(tiny_v1)
    assert (m.v2, m.v_prediction) == (False, False)
    assert m.unet is not None and m.vae is not None and m.text_encoder is not None and m.tokenizer is not None


def test_v2_v_detected(tiny_v2):
    m = load_model(tiny_v2, components=("unet",))
    assert (m.v2, m.v_prediction, m.prediction_type) == (True, True, "v_prediction")
    assert m.vae is None


def test_explicit_contradiction_is_an_error(tiny_v2):
    with pytest.raises(UsageError, match="contradicts"):
        load_model(tiny_v2, model_type="v1", components=())


def test_explicit_prediction_wins(tiny_v1):
    assert load_model(tiny_v1, prediction="v", components=()).v_prediction is True


def test_missing_source(tmp_path):
    with pytest.raises(ModelError):
        load_model(tmp_path / "nope")


def test_load_vae_from_model_and_from_vae_folder(tiny_v1, tmp_path):
    vae = load_vae(tiny_v1)
    vae.save_pretrained(tmp_path / "vae-only")
    vae2 = load_vae(tmp_path / "vae-only")
    assert vae2.config.scaling_factor == vae.config.scaling_factor


def test_source_dtype_is_that_of_the_weights_loaded_not_of_a_variant(tiny_v1, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_v1, tmp_path / "m")
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    half = {k: v.half() for k, v in weights.items()}
    save_file(half, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")  # a variant diffusers skips
    m = load_model(folder, components=("unet",))
    assert next(m.unet.parameters()).dtype == torch.float32
    assert m.source_dtype == torch.float32
