"""SDXL model I/O: LDM/SGM single files ⇄ diffusers folders, checked with diffusers' own SDXL single-file loader."""

from __future__ import annotations

import pytest
import torch

from sdtool.errors import UsageError
from sdtool.models import families
from sdtool.models.checkpoint import read_checkpoint
from sdtool.models.families.sdxl import SDXL
from sdtool.models.loading import load_model
from sdtool.models.saving import modelspec_metadata, save_diffusers, save_single_file
from tests.models.conftest import assert_same_weights

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")

pytestmark = pytest.mark.slow


def test_family_detected_from_configs_and_weights(tiny_sdxl, tiny_sdxl_file):
    assert load_model(tiny_sdxl, components=()).family is SDXL
    state, _ = read_checkpoint(tiny_sdxl_file)
    assert families.detect_ldm(state) is SDXL
    # The U-Net alone still says SDXL (its label_emb micro-conditioning).
    unet_only = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    assert families.detect_ldm(unet_only) is SDXL


def test_sgm_layout_of_the_file(tiny_sdxl, tiny_sdxl_file):
    state, meta = read_checkpoint(tiny_sdxl_file)
    model = load_model(tiny_sdxl, components=("text_encoder",))
    g = "conditioner.embedders.1.model."
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state
    assert state[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (144, 48)  # q, k, v fused
    assert g + "ln_final.weight" in state and g + "positional_embedding" in state and g + "logit_scale" in state
    # OpenCLIP stores x @ P; transformers' Linear computes x @ W.T: the file holds the transpose (as SGM's files do).
    assert torch.equal(state[g + "text_projection"], model.text_encoder_2.text_projection.weight.T)
    assert "model.diffusion_model.label_emb.0.0.weight" in state and "model.diffusion_model.label_emb.0.2.bias" in state
    assert state["model.diffusion_model.input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projections
    assert not any(k.startswith("cond_stage_model.") for k in state)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_file_loads_identically_with_diffusers_sdxl_from_single_file(dtype, tiny_sdxl, tmp_path):
    """The independent oracle: diffusers' StableDiffusionXLPipeline.from_single_file reads the same weights back."""
    from diffusers import StableDiffusionXLPipeline

    source = load_model(tiny_sdxl, dtype=dtype)
    path = save_single_file(source, tmp_path / "m.safetensors", family=SDXL, v_prediction=False, dtype=dtype)
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), torch_dtype=dtype)
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(pipe, part))
    assert pipe.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_file_to_diffusers_to_file_is_exact(dtype, tiny_sdxl, tmp_path):
    source = load_model(tiny_sdxl, dtype=dtype)
    first = save_single_file(source, tmp_path / "a.safetensors", family=SDXL, v_prediction=False, dtype=dtype)
    loaded = load_model(first, config=tiny_sdxl, dtype=dtype)
    assert loaded.family is SDXL
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(loaded, part))
    folder = save_diffusers(loaded, tmp_path / "folder", dtype=dtype)
    again = load_model(folder, dtype=dtype)
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(again, part))
    second = save_single_file(again, tmp_path / "b.safetensors", family=SDXL, v_prediction=False, dtype=dtype)
    a, _ = read_checkpoint(first)
    b, _ = read_checkpoint(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_v_prediction_and_zero_snr_survive_every_conversion(tiny_sdxl, tmp_path):
    source = load_model(tiny_sdxl)
    source.v_prediction = True
    source.scheduler_config = {**source.scheduler_config, "rescale_betas_zero_snr": True}
    meta = modelspec_metadata(family=SDXL, v_prediction=True, title="v")
    path = save_single_file(source, tmp_path / "v.safetensors", family=SDXL, v_prediction=True, metadata=meta)
    state, header = read_checkpoint(path)
    assert "v_pred" in state and "ztsnr" in state  # ComfyUI's markers
    assert header["modelspec.prediction_type"] == "v" and header["modelspec.architecture"] == SDXL.architecture(True)
    loaded = load_model(path, config=tiny_sdxl)
    assert loaded.v_prediction and loaded.scheduler_config.get("rescale_betas_zero_snr") is True
    folder = save_diffusers(loaded, tmp_path / "folder")
    again = load_model(folder)
    assert again.v_prediction and again.scheduler_config.get("rescale_betas_zero_snr") is True
    # Without modelspec metadata, the marker alone carries the prediction type.
    plain = save_single_file(again, tmp_path / "plain.safetensors", family=SDXL, v_prediction=True)
    assert load_model(plain, config=tiny_sdxl, components=()).v_prediction


def test_contradicting_model_type_is_an_error(tiny_sdxl, tiny_sdxl_file):
    with pytest.raises(UsageError, match="contradicts the weights, which are sdxl"):
        load_model(tiny_sdxl_file, config=tiny_sdxl, model_type="v1", components=())
    with pytest.raises(UsageError, match="contradicts"):
        load_model(tiny_sdxl, model_type="v2", components=())
