"""Resuming with a changed config (CONTRACT §I): what the warning allows must really happen, and a state that
cannot continue is refused by name before any weights load.

The learning-rate oracle is diffusers' linear schedule written out by hand (diffusers.optimization
`get_linear_schedule_with_warmup`, no warmup): the rate of step s (1-based) is `base × (total − (s − 1)) / total`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.conftest import write_train_config

pytestmark = pytest.mark.slow

TRAIN = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = 4
cache_latents = false
seed = 3
max_data_loader_n_workers = 0
learning_rate = 1e-3
lr_scheduler = "linear"
optimizer_type = "AdamW"
save_every_n_steps = 2
save_state = true
{extra}
"""


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"]["unet"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def linear(base: float, step: int, total: int = 4) -> float:
    return base * (total - (step - 1)) / total


def test_resume_with_a_changed_learning_rate_applies_it_and_says_so(cli, tmp_path, tiny_v1):
    """Before: the warning said the change was allowed, and the run went on with the state's rate."""
    cfg = write_train_config(tmp_path, "out", TRAIN, 3, model=tiny_v1, extra="")
    assert cli("train", cfg).exit_code == 0
    out = tmp_path / "out"
    assert lrs(out) == pytest.approx({s: linear(1e-3, s) for s in (1, 2, 3, 4)})

    state = out / "m-step00000002-state"
    resumed = cli("train", cfg, "--set", f"resume={state}", "--set", "learning_rate=4e-3", "--set", "overwrite=true")
    assert resumed.exit_code == 0 and "unexpected" not in resumed.stderr, resumed.stderr
    text = " ".join(resumed.stderr.split())
    assert "learning_rate: 0.001 in the state, 0.004 now" in text  # the warning, as before
    assert "learning rate of unet: 0.004 from the config replaces 0.001 from the state, from step 3 on" in text
    rates = lrs(out)
    assert rates[1] == pytest.approx(linear(1e-3, 1)) and rates[2] == pytest.approx(linear(1e-3, 2))
    assert rates[3] == pytest.approx(linear(4e-3, 3)) and rates[4] == pytest.approx(linear(4e-3, 4))


def test_an_unchanged_resume_says_nothing_about_rates(cli, tmp_path, tiny_v1):
    cfg = write_train_config(tmp_path, "out", TRAIN, 3, model=tiny_v1, extra="")
    assert cli("train", cfg).exit_code == 0
    state = tmp_path / "out" / "m-step00000002-state"
    resumed = cli("train", cfg, "--set", f"resume={state}", "--set", "overwrite=true")
    assert resumed.exit_code == 0, resumed.stderr
    assert "learning rate of" not in resumed.stderr and "changed config" not in resumed.stderr


def test_resuming_on_another_model_family_is_refused_at_config_time(cli, tmp_path, tiny_v1, tiny_v2):
    """Before: the model loaded, then accelerate failed with a screen-long `size mismatch` list."""
    cfg = write_train_config(tmp_path, "out", TRAIN, 3, model=tiny_v1, extra="")
    assert cli("train", cfg).exit_code == 0
    state = tmp_path / "out" / "m-step00000002-state"
    other = cli(
        "train", cfg, "--set", f"resume={state}", "--set", f"pretrained_model_name_or_path={tiny_v2}",
        "--set", "overwrite=true",
    )  # fmt: skip
    assert other.exit_code == 2 and "unexpected" not in other.stderr, other.stderr
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: resume: the state was trained on an SD v1 model, but {tiny_v2} is SD v2; resume with the model the "
        "state was saved from"
    ], other.stderr
    assert "model " not in other.stderr.split("error:")[0]  # refused before the model loaded
