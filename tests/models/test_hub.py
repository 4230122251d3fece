"""Hub models offline first (models/hub.py): the local Hugging Face cache is read before the network; a model that is
not cached, with the hub unreachable or HF_HUB_OFFLINE=1, fails within seconds with one line saying what to do.

"Unreachable" is a hub endpoint on a local port that refuses connections (HF_ENDPOINT), with an empty HF_HOME; the
cached case builds the cache's own layout (models--owner--name/refs/main → snapshots/<commit>/…, as huggingface_hub
writes it) around the tiny models.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdtool.models.hub import choose_files
from tests.conftest import REPO_ROOT
from tests.imagegen import save_rgb

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_TAGGER = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
README_MODEL = "runwayml/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A local TCP port that refuses connections: bound (so nothing else takes it) but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def offline_env(hf_home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    hub = {"HF_HOME": str(hf_home), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **hub, **extra}


def sdtool(args: list[object], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sdtool", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    save_rgb(folder / "a.png", 64, 64, seed=1)
    save_rgb(folder / "b.png", 96, 64, seed=2)
    meta = folder / "meta.json"
    sizes = ["--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128"]
    proc = subprocess.run(
        [sys.executable, "-m", "sdtool", "-q", "bucket", folder, "-o", meta, *sizes],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.mark.parametrize(
    ("what", "args"),
    [
        ("captioning model", ["caption", "{images}"]),
        ("tagger", ["tag", "{images}"]),
        ("model", ["cache", "{images}/meta.json", "--model", README_MODEL]),
    ],
)
@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_model_not_in_the_cache_fails_within_seconds_with_one_line(
    tmp_path, images, closed_port, what, args, offline
):
    env = offline_env(tmp_path / "hf-home", closed_port, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    proc, seconds = sdtool([a.format(images=images) for a in args], env, tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line: no retries, no library warnings
    (line,) = lines
    model = {"caption": DEFAULT_CAPTIONER, "tag": DEFAULT_TAGGER, "cache": README_MODEL}[args[0]]
    assert line.startswith(f"error: the {what} {model} is not in the Hugging Face cache")
    assert "--model DIR" in line and "HF_HUB_OFFLINE" in line
    assert ("HF_HUB_OFFLINE=1 forbids" in line) if offline else (f"127.0.0.1:{closed_port}) cannot be reached" in line)
    # The bound (from process start, imports included): the retries it replaces took minutes.
    assert seconds < 10, seconds


def cache_repo(hf_home: Path, repo_id: str, source: Path) -> None:
    """Put a model folder into the hub cache's layout, as huggingface_hub leaves it after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_cached_models_load_without_touching_the_hub(tmp_path, images, closed_port):
    from sdtool.demo.data import copy_demo_tagger
    from sdtool.label.tiny import save_tiny_blip
    from sdtool.models.tiny import save_tiny_model

    hf_home = tmp_path / "hf-home"
    cache_repo(hf_home, DEFAULT_CAPTIONER, save_tiny_blip(tmp_path / "blip"))
    cache_repo(hf_home, DEFAULT_TAGGER, copy_demo_tagger(tmp_path / "tagger"))
    cache_repo(hf_home, README_MODEL, save_tiny_model(tmp_path / "sd", "v1"))
    env = offline_env(hf_home, closed_port)  # the hub refuses every connection: only the cache can serve
    work = tmp_path / "work"
    shutil.copytree(images, work)

    for args in (
        ["caption", work, "--max-length", "5"],
        ["tag", work],
        ["cache", work / "meta.json", "-m", README_MODEL],
    ):
        proc, _ = sdtool(args, env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "error" not in proc.stderr and "Warning" not in proc.stderr
    assert len(list(work.glob("*.caption"))) == 2 and len(list(work.glob("*.txt"))) == 2
    assert len(list((work / "meta.latents").glob("*.safetensors"))) == 2
    status, _ = sdtool(["cache", work / "meta.json", "-m", README_MODEL, "--status", "--strict"], env, tmp_path)
    assert status.returncode == 0 and "the VAE is not compared" not in status.stderr  # fingerprinted from the cache


def test_downloads_take_configs_and_one_set_of_weights():
    # A diffusers repo as runwayml/stable-diffusion-v1-5 lays it out: variants, pickles, EMA and root checkpoints.
    listing = [
        "model_index.json",
        "README.md",
        "v1-5-pruned.ckpt",
        "v1-5-pruned-emaonly.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/flax_model.msgpack",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
    ]
    folders = {"": False, "scheduler": False, "unet": True, "text_encoder": False, "vae": True, "tokenizer": False}
    assert sorted(choose_files(listing, folders)) == sorted(
        [
            "model_index.json",
            "README.md",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",  # safetensors over the pickle, no fp16/EMA variant
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",  # the only plain weights there
            "text_encoder/config.json",  # configs only: its weights were not asked for
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ]
    )
