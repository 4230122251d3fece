"""doctor's accelerate check: the launch configuration, the devices a multi-process run would use."""

from __future__ import annotations

import importlib.util

import pytest

from sdtool.doctor import check_accelerate

DEEPSPEED = "distributed_type: DEEPSPEED\nnum_processes: 8\nnum_machines: 2\ndeepspeed_config:\n  zero_stage: 3\n"


def test_reports_the_accelerate_config_and_devices(tmp_path):
    import torch

    path = tmp_path / "ddp.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n")
    check = check_accelerate(path)
    assert check.status == "ok"
    assert f"config {path}: MULTI_GPU, 2 process(es) on 1 machine(s)" in check.detail
    if not torch.cuda.is_available():
        assert "no CUDA device: multi-process runs use CPU processes with gloo" in check.detail
    else:
        assert f"{torch.cuda.device_count()} CUDA device(s) visible" in check.detail


def test_deepspeed_selected_without_the_package_is_a_warning(tmp_path):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    path = tmp_path / "ds.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\n" + DEEPSPEED)
    check = check_accelerate(path)
    assert check.status == "warn"
    assert "DEEPSPEED, 8 process(es) on 2 machine(s)" in check.detail
    assert "DeepSpeed (ZeRO 3) selected but not installed: pip install deepspeed" in check.detail
