"""Fixtures for model I/O tests: the tiny models as LDM single files."""

from __future__ import annotations

from pathlib import Path

import pytest


def _write_single_file(folder: Path, out: Path) -> Path:
    from sdtool.models.loading import load_model
    from sdtool.models.saving import modelspec_metadata, save_single_file

    model = load_model(folder, components=("unet", "vae", "text_encoder", "scheduler"))
    meta = modelspec_metadata(family=model.family, v_prediction=model.v_prediction, title=out.stem)
    return save_single_file(model, out, family=model.family, v_prediction=model.v_prediction, metadata=meta)


@pytest.fixture(scope="session")
def tiny_v1_file(tiny_v1, tmp_path_factory) -> Path:
    """The tiny v1 model as an LDM .safetensors file with modelspec metadata."""
    return _write_single_file(tiny_v1, tmp_path_factory.mktemp("files") / "tiny-v1.safetensors")


@pytest.fixture(scope="session")
def tiny_v2_file(tiny_v2, tmp_path_factory) -> Path:
    """The tiny v2 (v-prediction) model as an LDM .safetensors file with modelspec metadata."""
    return _write_single_file(tiny_v2, tmp_path_factory.mktemp("files") / "tiny-v2.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL model as an LDM/SGM .safetensors file with modelspec metadata."""
    return _write_single_file(tiny_sdxl, tmp_path_factory.mktemp("files") / "tiny-sdxl.safetensors")


def assert_same_weights(a, b) -> None:
    """Bit-identical state dicts (same keys, dtypes and values)."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
