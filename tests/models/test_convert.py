"""`sdtool convert` through the CLI: formats, precision, --vae, errors and exit codes."""

from __future__ import annotations

import pytest
import torch

from sdtool.models.checkpoint import read_checkpoint
from sdtool.models.convert import target_format
from sdtool.models.loading import load_model
from sdtool.models.vae import load_vae
from tests.models.conftest import assert_same_weights

PARTS = ("unet", "vae", "text_encoder")


def test_target_format_rules(tmp_path):
    from sdtool.errors import UsageError

    assert target_format(tmp_path / "m.safetensors") == "safetensors"
    assert target_format(tmp_path / "m.CKPT") == "ckpt"
    assert target_format(tmp_path / "m") == "diffusers"
    assert target_format(tmp_path / "sd-1.5") == "diffusers"
    assert target_format(tmp_path / "m.model", "diffusers") == "diffusers"
    with pytest.raises(UsageError):
        target_format(tmp_path / "m.model")
    with pytest.raises(UsageError):
        target_format(tmp_path / "m.safetensors", "ckpt")


@pytest.mark.slow
def test_diffusers_to_safetensors_and_back(cli, tiny_v2, tmp_path):
    dst = tmp_path / "m.safetensors"
    result = cli("convert", tiny_v2, dst)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{dst}\n"  # only the path on stdout; the summary goes to stderr
    assert "converted" in result.stderr
    _, meta = read_checkpoint(dst)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.title"] == "m"
    assert meta["modelspec.resolution"] == "256x256"  # the tiny U-Net's sample size × 8
    folder = tmp_path / "back"
    result = cli("convert", dst, folder, "--config", tiny_v2)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(folder)
    source, back = load_model(tiny_v2), load_model(folder)
    assert back.prediction_type == "v_prediction"
    for part in PARTS:
        assert_same_weights(getattr(source, part), getattr(back, part))


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_honoured_and_kept(cli, tiny_v1, tmp_path, precision, dtype):
    half = tmp_path / "half.ckpt"
    assert cli("convert", tiny_v1, half, "--precision", precision).exit_code == 0
    state = torch.load(half, weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}
    # Without --precision the output keeps the source's precision.
    again = tmp_path / "again.safetensors"
    result = cli("convert", half, again, "--config", tiny_v1)
    assert result.exit_code == 0, result.stderr
    assert {t.dtype for t in read_checkpoint(again)[0].values() if t.is_floating_point()} == {dtype}


@pytest.mark.slow
def test_vae_is_replaced(cli, tiny_v1, tmp_path):
    from sdtool.models.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", "v1", seed=5)
    dst = tmp_path / "m.safetensors"
    assert cli("convert", tiny_v1, dst, "--vae", other).exit_code == 0
    assert_same_weights(load_vae(other), load_vae(dst))


@pytest.mark.slow
def test_existing_destination_needs_overwrite(cli, tiny_v1, tmp_path):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"keep me")
    result = cli("convert", tiny_v1, dst)
    assert result.exit_code == 1
    assert "--overwrite" in result.stderr
    assert dst.read_bytes() == b"keep me"
    assert cli("convert", tiny_v1, dst, "--overwrite").exit_code == 0
    assert read_checkpoint(dst)[0]


@pytest.mark.slow
def test_usage_errors_exit_2(cli, tiny_v1, tiny_v2, tiny_v2_file, tmp_path):
    cases = [
        ("convert", tiny_v2, tmp_path / "a.safetensors", "--model-type", "v1"),
        ("convert", tiny_v2_file, tmp_path / "b.safetensors", "--config", tiny_v2, "--model-type", "v1"),
        ("convert", tiny_v1, tmp_path / "c.bin"),
        ("convert", tiny_v1, tmp_path / "d.safetensors", "--to", "ckpt"),
        ("convert", tiny_v1, tmp_path / "e.safetensors", "--config", tiny_v2),
        ("convert", tiny_v1, tmp_path / "f.safetensors", "--precision", "fp8"),
    ]
    for args in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stdout == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_runtime_errors_exit_1(cli, tiny_v1_file, tmp_path):
    missing = cli("convert", tmp_path / "nope.safetensors", tmp_path / "x.safetensors")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr  # a usage error, as on every command
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    unreadable = cli("convert", junk, tmp_path / "x.safetensors")
    assert unreadable.exit_code == 1 and "error:" in unreadable.stderr
    no_config = cli("convert", tiny_v1_file, tmp_path / "y.safetensors")
    assert no_config.exit_code == 1 and "--config" in no_config.stderr


@pytest.mark.slow
def test_pickle_refused_through_cli(cli, tiny_v1, tiny_v1_file, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": read_checkpoint(tiny_v1_file)[0], "x": Payload()}, path)
    result = cli("convert", path, tmp_path / "out.safetensors", "--config", tiny_v1)
    assert result.exit_code == 1
    assert "--allow-pickle" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_vae_less_file_needs_vae(cli, tiny_v1, tiny_v1_file, tmp_path):
    from safetensors.torch import save_file

    state, _ = read_checkpoint(tiny_v1_file)
    save_file(
        {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors"
    )
    result = cli("convert", tmp_path / "novae.safetensors", tmp_path / "o.safetensors", "--config", tiny_v1)
    assert result.exit_code == 1 and "--vae" in result.stderr
    result = cli(
        "convert", tmp_path / "novae.safetensors", tmp_path / "o.safetensors", "--config", tiny_v1, "--vae", tiny_v1
    )
    assert result.exit_code == 0, result.stderr
    assert read_checkpoint(tmp_path / "o.safetensors")[0].keys() == state.keys()
