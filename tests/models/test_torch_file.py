""".pt / .ckpt files that AUTOMATIC1111 opens: its own safe-loader check (tests/a1111.py, copied from
modules/safe.py) passes, and torch, diffusers' `from_single_file` and A1111's loader read the same values back."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch

from sdtool.models.torch_file import save_torch_file
from tests import a1111


def _payload():
    gen = torch.Generator().manual_seed(0)
    return {
        "state_dict": {"a.weight": torch.randn(3, 4, generator=gen), "b": torch.arange(5), "h": torch.ones(2).half()},
        "step": 7,
        "name": "x",
        "nested": [1, 2.5, {"k": None, "flag": True}],
    }


def test_plain_torch_save_is_refused_by_a1111(tmp_path):
    """The reason for the writer: torch ≥ 2.6 adds records that A1111's allow-list refuses."""
    path = tmp_path / "plain.pt"
    torch.save(_payload(), path)
    with pytest.raises(Exception, match="bad file inside"):
        a1111.check_pt(path)


@pytest.mark.parametrize("name", ["my-hn.v1.pt", "model.ckpt", "noext", "héllo wörld.pt"])
def test_written_file_passes_a1111_and_loads_equal(tmp_path, name):
    path = save_torch_file(_payload(), tmp_path / name)
    a1111.check_pt(path)  # raises where A1111 would refuse the file
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        infos = z.infolist()
    stem = path.stem if "." in name else name
    assert {n.split("/")[0] for n in names} == {stem}  # the file's own stem, not the temporary name
    assert sorted(n.split("/", 1)[1] for n in names if not n.split("/", 1)[1].startswith("data/")) == [
        "data.pkl",
        "version",
    ]
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    with open(path, "rb") as f:  # every record's data starts on a 64-byte boundary, as torch writes them
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    expected = _payload()
    for kwargs in ({}, {"mmap": True}):
        back = torch.load(path, weights_only=True, **kwargs)
        assert back.keys() == expected.keys()
        assert back["step"] == 7 and back["name"] == "x" and back["nested"] == expected["nested"]
        for key, tensor in expected["state_dict"].items():
            assert back["state_dict"][key].dtype == tensor.dtype
            assert torch.equal(back["state_dict"][key], tensor)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a1111_refuses_what_weights_only_refuses_too(tmp_path):
    """The oracle is not a rubber stamp: a pickled numpy scalar (NumPy 2 names numpy._core) is refused by both."""
    import numpy as np

    path = save_torch_file({"layer_structure": [np.float64(1.0)]}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="forbidden"):
        a1111.check_pt(path)


@pytest.mark.slow
def test_ckpt_passes_a1111_and_diffusers_reads_it_back_equal(tiny_v1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtool.models.families.sd1 import SD1
    from sdtool.models.loading import load_model
    from sdtool.models.saving import save_single_file
    from tests.models.conftest import assert_same_weights

    model = load_model(tiny_v1, components=("unet", "vae", "text_encoder"))
    for dtype in (None, torch.bfloat16):
        out = save_single_file(
            model, tmp_path / "m.ckpt", family=SD1, v_prediction=False, dtype=dtype, ckpt_extra={"global_step": 3}
        )
        a1111.check_pt(out)
        by_a1111 = a1111.a1111_torch_load(out)
        by_torch = torch.load(out, weights_only=True)
        assert by_a1111["global_step"] == by_torch["global_step"] == 3
        assert by_a1111["state_dict"].keys() == by_torch["state_dict"].keys()
        assert all(torch.equal(by_a1111["state_dict"][k], v) for k, v in by_torch["state_dict"].items())
    out = save_single_file(model, tmp_path / "m.ckpt", family=SD1, v_prediction=False)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_v1))
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(model, part), getattr(pipe, part))


@pytest.mark.slow
def test_convert_to_ckpt_passes_a1111(tiny_v1, cli, tmp_path):
    out = tmp_path / "tiny.ckpt"
    result = cli("convert", tiny_v1, out)
    assert result.exit_code == 0, result.stderr
    a1111.check_pt(out)
    with zipfile.ZipFile(out) as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"tiny"}
