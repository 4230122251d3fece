"""kill -9 of `sdtool cache` and `sdtool train` at random moments (CONTRACT §B, §H): whatever is under its final name
is whole, and running again (cache) or resuming from the latest state (train) gives exactly the uninterrupted result.

The helpers (process groups, the kill, the seed in every message) are those of test_interrupt.py.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtool.cache.entry import NATIVE_SUFFIX, read_native_record
from sdtool.fsutil import leftover_temp_files
from sdtool.metadata import read_metadata
from tests.hardening.test_interrupt import SEED, kill_group, make_dataset, run_to_end, start
from tests.train.conftest import write_train_config

pytestmark = pytest.mark.slow

BUCKET = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "16"]


def cache_entries(folder: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """name → (record, tensors) of every entry under its final name; each must load (i.e. be whole)."""
    if not folder.exists():
        return {}
    return {
        p.name: (read_native_record(p), load_file(p))
        for p in folder.iterdir()
        if p.name.endswith(NATIVE_SUFFIX) and not p.name.startswith(".")
    }


def assert_same_entries(a: dict, b: dict, where: object) -> None:
    """Same entries, same records; latents equal to float rounding (a rerun batches the remaining images anew)."""
    assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
    for name in a:
        assert a[name][0] == b[name][0], (where, name)
        ta, tb = a[name][1], b[name][1]
        assert ta.keys() == tb.keys(), (where, name)
        for key in ta:
            diff = (ta[key] - tb[key]).abs().max().item()
            assert diff <= 1e-5, (where, name, key, diff)


def test_kill_cache_then_rerun(tmp_path, tiny_v1):
    rng = random.Random(SEED)
    images = tmp_path / "images"
    make_dataset(images, 24)
    meta = tmp_path / "meta.json"
    run_to_end(["bucket", images, "-o", meta, *BUCKET], tmp_path / "bucket.log")
    good = len(read_metadata(meta)) - 1  # the truncated JPEG is bucketed (header) but never cached
    args = ["cache", meta, "-m", tiny_v1, "--workers", "1", "--batch-size", "2"]
    run_to_end([*args, "--cache-dir", tmp_path / "reference"], tmp_path / "reference.log")
    expected = cache_entries(tmp_path / "reference")
    assert len(expected) == good

    interrupted = 0
    for attempt in range(2):
        cache_dir = tmp_path / f"run{attempt}"
        target = rng.randrange(0, good)  # kill once this many entries are in place
        proc = start([*args, "--cache-dir", cache_dir], tmp_path / f"run{attempt}.log")
        while proc.poll() is None and len(list(cache_dir.glob(f"*{NATIVE_SUFFIX}"))) < target:
            time.sleep(0.002)
        interrupted += kill_group(proc)
        found = cache_entries(cache_dir)  # every entry under its final name loads …
        assert_same_entries(found, {k: expected[k] for k in found}, (SEED, attempt))  # … and is the right one

        run_to_end([*args, "--cache-dir", cache_dir], tmp_path / f"rerun{attempt}.log")
        assert_same_entries(cache_entries(cache_dir), expected, (SEED, attempt))
        assert leftover_temp_files(cache_dir) == [], (SEED, attempt)  # the rerun cleared the kill's debris
    assert interrupted, f"seed {SEED}: no kill landed while cache was running"


TRAIN = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 11
max_data_loader_n_workers = 0
learning_rate = 1e-3
optimizer_type = "AdamW"
save_every_n_steps = 1
save_state = true
{extra}
"""
STEPS = 4


def train_config(tmp_path: Path, model: Path, out: str, extra: str = "") -> Path:
    return write_train_config(tmp_path, out, TRAIN, 3, model=model, steps=STEPS, extra=extra)


def states(out: Path) -> dict[int, Path]:
    """step → state folder, for every state under its final name; each must read and its weights must load."""
    from sdtool.train.checkpoints import read_state

    found = {}
    for path in out.glob("m-step*-state"):
        record = read_state(path)
        step = int(re.fullmatch(r"m-step(\d+)-state", path.name)[1])
        assert record["train_state"]["global_step"] == step, (SEED, path)
        weights = [p for p in path.iterdir() if p.suffix == ".safetensors"]
        assert weights, (SEED, path)
        for w in weights:
            assert all(torch.isfinite(t).all() for t in load_file(w).values()), (SEED, w)
        found[step] = path
    return found


def check_models(out: Path, reference: Path) -> None:
    """Every model file under its final name loads and equals the uninterrupted run's save of that step."""
    for path in out.glob("m-step*.safetensors"):
        a, b = load_file(path), load_file(reference / path.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (SEED, path.name)


def test_kill_train_then_resume_from_the_latest_state(tmp_path, tiny_v1):
    rng = random.Random(SEED)
    reference = tmp_path / "full"
    run_to_end(["train", train_config(tmp_path, tiny_v1, "full")], tmp_path / "full.log")
    assert sorted(states(reference)) == list(range(1, STEPS)) and (reference / "m.safetensors").exists()

    out = tmp_path / "killed"
    cfg = train_config(tmp_path, tiny_v1, "killed")
    resume: list[str] = []
    interrupted = 0
    for attempt in range(2):
        # Kill once a random number of states are in place, plus a random moment (mid-step or mid-save).
        done = len(states(out)) if out.exists() else 0
        if done >= STEPS - 1:
            break
        target = rng.randrange(done, STEPS - 1)
        proc = start(["train", cfg, *resume], tmp_path / f"run{attempt}.log")
        while proc.poll() is None and len(list(out.glob("m-step*-state"))) <= target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.3))
        interrupted += kill_group(proc)
        found = states(out)  # every state folder under its final name reads and loads
        check_models(out, reference)  # every model file under its final name loads and is right
        if (out / "m.safetensors").exists():
            break  # the kill came after the end
        if found:
            resume = ["--set", f"resume={found[max(found)]}"]
        else:
            # Killed before the first state: nothing to resume, the run starts again (its metrics file goes too).
            (out / "metrics.jsonl").unlink(missing_ok=True)
            resume = []
    assert interrupted, f"seed {SEED}: no kill landed while train was running"

    if not (out / "m.safetensors").exists():
        run_to_end(["train", cfg, *resume], tmp_path / "final.log")
    final, expected = load_file(out / "m.safetensors"), load_file(reference / "m.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final), SEED
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), (SEED, steps)
