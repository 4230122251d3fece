"""When the disk says no (docs/promises.md): a full disk, a read-only folder, a file where a folder
should be, a checkpoint that is not the model it is said to be. Each is one `error:` line naming the path and the
fix (at config time where the config can tell), never `unexpected <Exception>`, and nothing half-written is left
filling the disk. A sample that cannot be written is a warning; training goes on.

The full and read-only disks are real: a small tmpfs mounted in a private mount namespace (`unshare -rm`), so the
kernel itself answers ENOSPC and EROFS. Where the machine does not allow user namespaces those tests are skipped.

Before: `bucket` and `train` ended with `unexpected OSError`, a state save on a full disk with torch's
`enforce fail at inline_container.cc` and the partial state folder left behind, and a read-only output folder was
found only at the first save.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.imagegen import save_rgb
from tests.train.conftest import REPORT_FILES, write_train_config


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp && echo ok"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "ok"


needs_mounts = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm (user mount namespaces)")


def on_small_disk(mount: Path, options: str, setup: str, *args: object) -> subprocess.CompletedProcess:
    """Run `sdtool ARGS` with a fresh tmpfs (mount OPTIONS) on `mount`, after the shell `setup` (which sees the mount
    as $0); stdout is the listing of what is left there afterwards (the mount vanishes with the namespace)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = (
        f'mount -t tmpfs -o {options} none "$0" || exit 99; {setup}\n'
        'py="$1"; shift; "$py" -m sdtool "$@"; rc=$?; ls -A "$0"; exit $rc'
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(mount), sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        save_rgb(folder / f"{i}.png", 32, 32, seed=i)
    return folder


@needs_mounts
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp(tmp_path, images):
    disk = tmp_path / "disk"
    fill = 'head -c 1M /dev/zero > "$0/fill" 2>/dev/null'  # fill the 256 KiB disk
    result = on_small_disk(disk, "size=256k", fill, "bucket", images, "-o", disk / "meta.json")
    assert result.returncode == 1, result.stderr
    error = one_line(result)
    assert error.startswith(f"error: cannot write {disk / 'meta.json'}: No space left on device"), error
    assert "free space" in error
    assert result.stdout.split() == ["fill"]  # no temp file left


@needs_mounts
@pytest.mark.slow
def test_a_full_disk_during_a_state_save_names_it_and_removes_the_partial_state(tmp_path, tiny_v1):
    """The final model (17 MB) fits on the 30 MB disk, the state (29 MB) does not."""
    template = (
        'pretrained_model_name_or_path = "{model}"\noutput_dir = "{out}"\noutput_name = "m"\nmax_train_steps = 1\n'
        "cache_latents = false\nmax_data_loader_n_workers = 0\nsave_state_on_train_end = true\n"
    )
    disk = tmp_path / "disk"
    cfg = write_train_config(tmp_path, "disk", template, 2, model=tiny_v1)
    result = on_small_disk(disk, "size=30m", "", "train", cfg)
    assert result.returncode == 1, result.stderr
    error = one_line(result)
    assert error.startswith(f"error: cannot save the training state to {disk / 'm-state'}: "), error
    assert "free space on the disk" in error and "inline_container" not in error
    listed = sorted(name for name in result.stdout.split() if name not in REPORT_FILES)
    assert listed == ["m.safetensors", "metrics.jsonl"]  # no partial state filling the disk


@needs_mounts
def test_a_read_only_output_folder_is_a_config_error_and_a_one_line_write_error(tmp_path, images, tiny_v1):
    disk = tmp_path / "disk"
    from tests.train.conftest import dataset_toml, make_dataset, write_config

    data_images, meta = make_dataset(tmp_path / "data", 2)
    text = f'pretrained_model_name_or_path = "{tiny_v1}"\noutput_dir = "{disk / "out"}"\nmax_train_steps = 1\n'
    cfg = write_config(tmp_path / "train.toml", text + dataset_toml(meta, data_images))
    train = on_small_disk(disk, "ro", "", "train", cfg)
    assert train.returncode == 2, train.stderr
    assert one_line(train) == (
        f"error: output_dir: {disk} is on a read-only file system; choose a folder you can write to"
    )
    bucket = on_small_disk(disk, "ro", "", "bucket", images, "-o", disk / "meta.json")
    assert bucket.returncode == 1, bucket.stderr
    assert one_line(bucket).startswith(f"error: cannot write {disk / 'meta.json'}: Read-only file system")


def test_a_file_where_a_folder_should_be(cli, tmp_path):
    (tmp_path / "file").write_text("not a folder\n")
    demo = cli("demo", "--dir", tmp_path / "file" / "demo")
    assert demo.exit_code == 2, demo.stderr
    assert demo.stderr.strip() == (
        f"error: --dir {tmp_path / 'file' / 'demo'}: {tmp_path / 'file'} is not a folder (pass --dir with a new or "
        "empty folder you can write to)"
    )


def test_a_checkpoint_that_is_not_the_model_it_is_told_to_be(cli, tmp_path):
    """Before: `unexpected SingleFileComponentError` from diffusers."""
    import torch

    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.foo": torch.zeros(3, 3)}}, ckpt)
    result = cli("convert", ckpt, tmp_path / "out", "--model-type", "v1")
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith(f"error: {ckpt}: the weights do not fit the built-in sd15 configs"), result.stderr
    assert "unexpected" not in result.stderr


@pytest.mark.slow
def test_a_failed_sample_is_a_warning_and_training_goes_on(cli, tmp_path, tiny_v1):
    """Before: the first sample's failure ended the run (`unexpected FileExistsError`)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2\n")
    template = (
        'pretrained_model_name_or_path = "{model}"\noutput_dir = "{out}"\noutput_name = "m"\nmax_train_steps = 2\n'
        f'cache_latents = false\nmax_data_loader_n_workers = 0\nsample_prompts = "{prompts}"\n'
        "sample_every_n_steps = 1\n"
    )
    cfg = write_train_config(tmp_path, "out", template, 2, model=tiny_v1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample").write_text("a file where the sample folder goes\n")
    result = cli("train", cfg)
    assert result.exit_code == 0, result.stderr
    assert "warning: the samples at step 1 failed and were skipped" in " ".join(result.stderr.split())
    assert (tmp_path / "out" / "m.safetensors").is_file()
