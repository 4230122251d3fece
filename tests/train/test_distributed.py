"""Data-parallel training: how global batches are split, the launcher, and 2-process gloo runs on the tiny model."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from sdtool.errors import MissingDependencyError, UsageError
from sdtool.launch import LaunchOptions, check_launch, launch_argv
from sdtool.train.distributed import Shard, ShardedBatchSampler, split_batch
from tests.conftest import REPO_ROOT
from tests.train.conftest import make_dataset, run_outputs, write_config
from tests.train.test_train import config_text


def sampler_for(tmp_path, n_images: int, global_batch: int):
    from sdtool.train.config import load_config
    from sdtool.train.dataset import BucketBatchSampler, load_items

    images, meta = make_dataset(tmp_path / "data", n_images)
    text = config_text(
        model=tmp_path, out=tmp_path / "o", steps=1, images=images, meta=meta, precision="float", workers=0
    )
    cfg = load_config(write_config(tmp_path / "c.toml", text), [])
    items, subsets = load_items(cfg.datasets)
    return items, BucketBatchSampler(items, subsets, [global_batch], seed=3)


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_split_batch_covers_every_row_once_evenly(size, processes):
    parts = [split_batch(size, r, processes) for r in range(processes)]
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    lengths = [stop - start for start, stop in parts]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("processes", [2, 3])
def test_ranks_share_each_global_batch_in_one_bucket(tmp_path, processes):
    # 7 images: 5 square (64x64), 2 tall (64x128); per-process batch 2 → short batches in both buckets.
    items, base = sampler_for(tmp_path, 7, 2 * processes)
    ranks = [list(ShardedBatchSampler(base, r, processes)) for r in range(processes)]
    assert all(len(batches) == len(base) for batches in ranks)
    for step, global_batch in enumerate(base.batches(0)):
        parts = [ranks[r][step] for r in range(processes)]
        shards = [part[0][1] for part in parts]
        real = [key for part, shard in zip(parts, shards, strict=True) if shard.real for key, _ in part]
        # Every image of the global batch exactly once, in order, with its global slot (seeds match one process).
        assert [key[0] for key in real] == global_batch
        assert [key[3] for key in real] == list(range(len(global_batch)))
        assert len({items[key[0]].bucket for part in parts for key, _ in part}) == 1
        # DDP averages over ranks: the weights make that the mean over the global batch.
        assert sum(s.weight for s in shards) == pytest.approx(processes)
        for part, shard in zip(parts, shards, strict=True):
            assert all(s is shard for _, s in part)
            assert len(part) == (shard.real or 1)  # a rank without an image gets one zero-weighted stand-in


def test_one_process_is_the_base_sampler_with_weight_one(tmp_path):
    _, base = sampler_for(tmp_path, 5, 2)
    sharded = list(ShardedBatchSampler(base, 0, 1))
    assert [[key for key, _ in batch] for batch in sharded] == list(base)
    assert {shard.weight for batch in sharded for _, shard in batch} == {1.0}
    assert Shard(0, 3, 3, 1).rows(3) == slice(0, 3)


def test_plan_counts_global_batches_processes_and_accumulation(tmp_path, monkeypatch):
    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan

    images, meta = make_dataset(tmp_path / "data", 7)  # 5 square + 2 tall
    text = config_text(
        model=tmp_path, out=tmp_path / "o", steps=1, images=images, meta=meta, precision="float", workers=0
    )
    config = write_config(tmp_path / "c.toml", text)
    cfg = load_config(config, ["gradient_accumulation_steps=2", "max_train_epochs=3"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = make_plan(cfg)
    # Global batch 2 × 2 = 4: square ceil(5/4) = 2 batches, tall 1 → 3 batches, ceil(3 / 2) = 2 steps per epoch.
    assert (plan.processes, plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (2, 3, 2, 6)
    monkeypatch.setenv("WORLD_SIZE", "1")
    plan = make_plan(cfg)
    assert (plan.processes, plan.batches_per_epoch, plan.steps_per_epoch) == (1, 4, 2)


def test_launch_command_line(tmp_path):
    argv = launch_argv(LaunchOptions(num_processes=4), ["train", "c.toml", "--set", "seed=1"])
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[-6:] == ["-m", "sdtool", "train", "c.toml", "--set", "seed=1"]
    launch = argv[3:-6]
    assert "--multi_gpu" in launch and launch[launch.index("--num_processes") + 1] == "4"
    assert launch[launch.index("--main_process_port") + 1] == "0"  # a free port on one machine

    multi = LaunchOptions(16, 2, 1, "10.0.0.1", 29500)
    check_launch(multi)
    launch = launch_argv(multi, ["train", "c.toml"])[3:]
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "10.0.0.1")):
        assert launch[launch.index(flag) + 1] == value
    assert launch[launch.index("--main_process_port") + 1] == "29500"

    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 8\n")
    launch = launch_argv(LaunchOptions(config_file=config), ["train", "c.toml"])[3:]
    assert launch[:2] == ["--config_file", str(config)] and "--num_processes" not in launch  # the file decides


def test_launch_refuses_what_cannot_work(tmp_path, monkeypatch):
    with pytest.raises(UsageError) as exc:
        check_launch(LaunchOptions(num_processes=3, num_machines=2))
    message = exc.value.message
    assert "--machine-rank, --main-process-ip, --main-process-port" in message and "multiple of" in message
    with pytest.raises(UsageError, match="no such file"):
        check_launch(LaunchOptions(config_file=tmp_path / "missing.yaml"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="already part of a launched run"):
        check_launch(LaunchOptions(num_processes=2))


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path, monkeypatch, cli):
    pytest.importorskip("accelerate")
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    config = tmp_path / "ds.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
        "deepspeed_config:\n  zero_stage: 2\n"
    )
    with pytest.raises(MissingDependencyError, match="deepspeed"):
        check_launch(LaunchOptions(config_file=config))
    # Started by `accelerate launch --use_deepspeed` directly: the training process says the same.
    from sdtool.train.distributed import check_launch_backend

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MissingDependencyError, match="needs the package 'deepspeed'") as exc:
        check_launch_backend()
    assert exc.value.hint == "pip install deepspeed"


def test_cli_launch_options_are_checked_before_anything_starts(cli, tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "data", 2)
    text = config_text(
        model=tiny_v1, out=tmp_path / "o", steps=1, images=images, meta=meta, precision="float", workers=0
    )
    result = cli("train", write_config(tmp_path / "c.toml", text), "--num-processes", "2", "--num-machines", "2")
    assert result.exit_code == 2
    assert "needs --machine-rank, --main-process-ip, --main-process-port" in result.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- 2 processes, gloo
def _config(tmp_path, model, name, batch_size, steps=4):
    # SGD: Adam's normalisation would blow float-order noise in near-zero gradients up to ±lr per step.
    images, meta = make_dataset(tmp_path / "data", 5)  # 4 square + 1 tall: the tall bucket's batch is short
    text = config_text(
        model=model, out=tmp_path / name, steps=steps, images=images, meta=meta, precision="float", workers=0
    )
    text = text.replace('"AdamW8bit"', '"SGDNesterov"').replace("batch_size = 2", f"batch_size = {batch_size}")
    return write_config(tmp_path / f"{name}.toml", text)


def _torchrun(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdtool"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=300)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(cli, tmp_path, tiny_v1):
    from safetensors.torch import load_file

    digests = tmp_path / "digests"
    two = _torchrun("train", _config(tmp_path, tiny_v1, "two", 1), env={"SDTOOL_RANK_DIGESTS": str(digests)})
    assert two.returncode == 0, two.stderr[-3000:]
    one = cli("train", _config(tmp_path, tiny_v1, "one", 2))
    assert one.exit_code == 0, one.stderr

    # Rank 0 alone reports, writes and saves; the other rank only trains.
    assert two.stdout.strip() == str(tmp_path / "two" / "tuned.safetensors")
    assert two.stderr.count("bucket plan") == 1 and two.stderr.count("saved ") == 1
    assert "2 processes; images per optimizer step (batch_size × processes × accumulation): 1 × 2 × 1 = 2" in two.stderr
    assert "3 batches per epoch" in two.stderr and "3 batches per epoch" in one.stderr
    assert run_outputs(tmp_path / "two") == ["metrics.jsonl", "tuned.safetensors"]

    # Both ranks end with the same weights, bit for bit.
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"unet", "text_encoder"}

    # The same global batches, noise and timesteps: what remains is floating-point reduction order.
    a, b = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["epoch"] for r in a] == [r["epoch"] for r in b]
    assert [r["timestep_mean"] for r in a] == [r["timestep_mean"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    wa, wb = load_file(tmp_path / "two" / "tuned.safetensors"), load_file(tmp_path / "one" / "tuned.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_num_processes_launches_through_accelerate(sdtool_proc, tmp_path, tiny_v1):
    result = sdtool_proc(
        "train",
        _config(tmp_path, tiny_v1, "launched", 2),
        "--num-processes",
        "2",
        "--dry-run",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching: accelerate launch --multi_gpu --num_processes 2" in result.stderr
    assert result.stderr.count("bucket plan") == 1
    assert "images per optimizer step (batch_size × processes × accumulation): 2 × 2 × 1 = 4" in result.stderr
    assert "dry run: nothing trained" in result.stderr
    assert not (tmp_path / "launched").exists()


def test_kohya_deepspeed_keys_point_to_the_accelerate_config(cli, tmp_path):
    images, meta = make_dataset(tmp_path / "data", 2)
    text = config_text(
        model=tmp_path, out=tmp_path / "o", steps=1, images=images, meta=meta, precision="float", workers=0
    )
    config = write_config(tmp_path / "c.toml", text)
    result = cli("train", config, "--set", "deepspeed=true", "--set", "zero_stage=3", "--dry-run")
    assert result.exit_code == 2
    assert "zero_stage" in result.stderr and "deepspeed" in result.stderr and "--accelerate-config" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("to_disk", [True, False])
def test_two_gloo_processes_encode_missing_latents_before_training(tmp_path, tiny_v1, to_disk):
    """cache_latents under torchrun: to disk the ranks share the encoding (each image once) before accelerate
    starts; in memory every rank encodes what it trains on. Either way both ranks train to the end."""
    config = _config(tmp_path, tiny_v1, "two", 1, steps=2)
    extra = "cache_latents = true\n" + ("cache_latents_to_disk = true\n" if to_disk else "")
    config.write_text(config.read_text().replace("cache_latents = false\n", extra))
    two = _torchrun("train", config)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == str(tmp_path / "two" / "tuned.safetensors")
    entries = sorted((tmp_path / "data" / "meta.latents").glob("*.safetensors"))
    if to_disk:
        assert len(entries) == 5 and "encoding 5 images in" in two.stderr and "2 processes" in two.stderr
    else:
        assert entries == [] and "kept in memory for this run" in two.stderr
    assert two.stderr.count("no usable cached latents") == 1  # rank 0 alone reports
