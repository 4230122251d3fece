"""Single files: round trips checked against diffusers' own single-file loader, precision, .ckpt, safety."""

from __future__ import annotations

import pytest
import torch

from sdtool.errors import ModelError, UnsafeCheckpointError, UsageError
from sdtool.models.checkpoint import read_checkpoint
from sdtool.models.families.sd1 import SD1
from sdtool.models.families.sd2 import SD2
from sdtool.models.loading import load_model
from sdtool.models.saving import save_diffusers, save_single_file
from sdtool.models.vae import load_vae
from tests.models.conftest import assert_same_weights

PARTS = ("unet", "vae", "text_encoder")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_single_file_loads_identically_with_diffusers_from_single_file(kind, request):
    """The independent oracle: diffusers' own pipeline loader reads our file back to the very same weights."""
    from diffusers import StableDiffusionPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    path = request.getfixturevalue(f"tiny_{kind}_file")
    source = load_model(folder)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder))
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(pipe, part))
    assert pipe.scheduler.config.prediction_type == source.prediction_type


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_single_file_to_diffusers_folder_and_back(kind, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{kind}")
    path = request.getfixturevalue(f"tiny_{kind}_file")
    source = load_model(folder)
    loaded = load_model(path, config=folder)
    assert (loaded.v2, loaded.v_prediction) == (kind == "v2", kind == "v2")
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(loaded, part))
    out = save_diffusers(loaded, tmp_path / "out")
    again = load_model(out)
    assert (again.v2, again.prediction_type) == (source.v2, source.prediction_type)
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(again, part))
    assert again.tokenizer("a photo").input_ids == source.tokenizer("a photo").input_ids


def test_v2_file_layout_and_metadata(tiny_v2_file):
    state, meta = read_checkpoint(tiny_v2_file)
    p = "cond_stage_model.model."
    assert state[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)  # q, k, v fused
    assert state[p + "text_projection"].shape == (32, 32)
    assert p + "logit_scale" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    assert state["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2  # linear for v2
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1×1 conv in LDM
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"


def test_v1_file_layout(tiny_v1_file):
    state, meta = read_checkpoint(tiny_v1_file)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert state["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 4
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize(("dtype", "fmt"), [(torch.float16, "safetensors"), (torch.bfloat16, "ckpt")])
def test_precision_is_the_only_float_dtype(dtype, fmt, tiny_v2, tmp_path):
    model = load_model(tiny_v2, components=PARTS)
    out = save_single_file(model, tmp_path / f"m.{fmt}", family=SD2, v_prediction=True, dtype=dtype)
    state, _ = read_checkpoint(out)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}
    assert next(model.unet.parameters()).dtype == torch.float32  # the model itself was not cast


def test_diffusers_output_in_fp16_and_model_untouched(tiny_v1, tmp_path):
    from safetensors.torch import load_file

    model = load_model(tiny_v1)
    out = save_diffusers(model, tmp_path / "half", dtype=torch.float16)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        tensors = load_file(out / f"{part}.safetensors")
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert next(model.unet.parameters()).dtype == torch.float32


def test_ckpt_round_trip_is_plain_tensors(tiny_v1, tiny_v1_file, tmp_path):
    model = load_model(tiny_v1, components=PARTS)
    out = save_single_file(model, tmp_path / "m.ckpt", family=SD1, v_prediction=False, ckpt_extra={"global_step": 7})
    payload = torch.load(out, weights_only=True)
    assert payload["global_step"] == 7
    reference, _ = read_checkpoint(tiny_v1_file)
    assert payload["state_dict"].keys() == reference.keys()
    back = load_model(out, config=tiny_v1, components=PARTS)
    for part in PARTS:
        assert_same_weights(getattr(model, part), getattr(back, part))


def test_old_text_encoder_layout_loads(tiny_v1, tiny_v1_file, tmp_path):
    from safetensors.torch import save_file

    state, _ = read_checkpoint(tiny_v1_file)
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in state.items()
    }
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    save_file(old, tmp_path / "old.safetensors")
    loaded = load_model(tmp_path / "old.safetensors", config=tiny_v1, components=("text_encoder",))
    assert_same_weights(load_model(tiny_v1, components=("text_encoder",)).text_encoder, loaded.text_encoder)


def test_v2_extras_are_carried_over(tiny_v2, tiny_v2_file, tmp_path):
    from safetensors.torch import save_file

    state, meta = read_checkpoint(tiny_v2_file)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(1.25)
    save_file(state, tmp_path / "x.safetensors", metadata=meta)
    model = load_model(tmp_path / "x.safetensors", config=tiny_v2, components=PARTS)
    out = save_single_file(model, tmp_path / "y.safetensors", family=SD2, v_prediction=True)
    assert read_checkpoint(out)[0]["cond_stage_model.model.logit_scale"].item() == 1.25


def test_pickle_payload_is_refused_and_never_runs(tiny_v1_file, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state, _ = read_checkpoint(tiny_v1_file)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(path)
    assert "--allow-pickle" in info.value.one_line()
    assert "io.open" in info.value.one_line()  # says what the pickle wanted
    assert not marker.exists()


def test_allow_pickle_loads_a_trusted_pickle(tiny_v1, tiny_v1_file, tmp_path):
    import argparse

    state, _ = read_checkpoint(tiny_v1_file)
    path = tmp_path / "args.ckpt"
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    loaded, _ = read_checkpoint(path, allow_pickle=True)
    assert loaded.keys() == state.keys()


def test_vae_from_single_files(tiny_v1, tiny_v1_file, tmp_path):
    from safetensors.torch import save_file

    reference = load_vae(tiny_v1)
    assert_same_weights(reference, load_vae(tiny_v1_file))  # config read off the weights
    state, _ = read_checkpoint(tiny_v1_file)
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")}
    torch.save(vae_only, tmp_path / "vae.pt")
    assert_same_weights(reference, load_vae(tmp_path / "vae.pt"))
    save_file(reference.state_dict(), tmp_path / "diffusers-vae.safetensors")
    assert_same_weights(reference, load_vae(tmp_path / "diffusers-vae.safetensors", config=tiny_v1))
    with pytest.raises(ModelError, match="not a VAE"):
        save_file({"x": torch.zeros(1)}, tmp_path / "nothing.safetensors")
        load_vae(tmp_path / "nothing.safetensors")


def test_contradicting_model_type_is_an_error(tiny_v2, tiny_v2_file):
    with pytest.raises(UsageError, match="contradicts"):
        load_model(tiny_v2_file, config=tiny_v2, model_type="v1", components=())


def test_tiny_file_without_config_names_config(tiny_v1_file):
    with pytest.raises(ModelError) as info:
        load_model(tiny_v1_file, components=("unet",))
    assert "--config" in info.value.one_line()


def test_missing_tokenizer_names_config(tiny_v1_file):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("openai/clip-vit-large-patch14", "tokenizer_config.json"), str):
        pytest.skip("the SD1 tokenizer is in this machine's hub cache")
    with pytest.raises(ModelError) as info:
        load_model(tiny_v1_file, components=("tokenizer",))
    assert "--config" in info.value.one_line()


def test_prediction_from_config_folder_and_explicit_override(tiny_v2, tiny_v2_file, tmp_path):
    from safetensors.torch import save_file

    state, _ = read_checkpoint(tiny_v2_file)
    save_file(state, tmp_path / "bare.safetensors")  # no modelspec: the config folder's scheduler decides
    assert load_model(tmp_path / "bare.safetensors", config=tiny_v2, components=()).v_prediction is True
    forced = load_model(tiny_v2_file, config=tiny_v2, prediction="epsilon", components=())
    assert (forced.v_prediction, forced.scheduler_config["prediction_type"]) == (False, "epsilon")
