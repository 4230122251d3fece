"""Bad training configs (CONTRACT §H): one `error: <key>: …` line that says how to fix it, exit 2, before any model
loads.

"Before any model loads" is shown without timing: the model folder has intact JSON configs but junk weight files,
so any attempt to load it fails with exit 1 and "cannot load the model" (the control case proves it). A config
problem must win: exit 2, and the loader's message never appears.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.train.conftest import dataset_toml, make_dataset, write_config

CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
max_train_steps = 2
cache_latents = false
max_data_loader_n_workers = 0
{extra}
"""


def junk_weights(src: Path, dst: Path) -> Path:
    """A copy of a tiny model whose configs are fine and whose weight files are not weights."""
    shutil.copytree(src, dst)
    weights = [p for p in dst.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for path in weights:
        path.write_bytes(b"not a tensor file")
    return dst


@pytest.fixture(scope="module")
def junk_models(tmp_path_factory, tiny_v1, tiny_v2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("junk")
    return {"v1": junk_weights(tiny_v1, root / "v1"), "v2": junk_weights(tiny_v2, root / "v2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data") / "d", 2)


def write(tmp_path: Path, model: Path, data: tuple[Path, Path], extra: str = "", subset=None, out=None) -> Path:
    images, meta = data
    text = CONFIG.format(model=model, out=out or tmp_path / "out", extra=extra)
    return write_config(tmp_path / "train.toml", text + dataset_toml(meta, images, **(subset or {})))


def test_control_the_junk_model_fails_when_it_is_loaded(cli, tmp_path, junk_models, data):
    result = cli("train", write(tmp_path, junk_models["v1"], data))
    assert result.exit_code == 1, result.stderr
    assert "cannot load the model" in result.stderr


# (config text, key the message starts with, words of which one must name the fix)
CASES = {
    "wrong type": ('learning_rate = "fast"', "learning_rate", ("valid number",)),
    "float for int": ("max_train_epochs = 2.5", "max_train_epochs", ("valid integer",)),
    "string for bool": ('save_state = "yes"', "save_state", ("valid boolean",)),
    "out of range": ("save_every_n_steps = 0", "save_every_n_steps", ("greater than or equal to 1",)),
    "unknown choice": ('mixed_precision = "fp8"', "mixed_precision", ("'bf16'",)),
    "unknown key": ("learnin_rate = 1e-4", "learnin_rate", ("did you mean 'learning_rate'",)),
    "unimplemented kohya key": ("torch_compile = true", "torch_compile", ("not implemented",)),
    "misspelt scheduler": ('lr_scheduler = "cosin"', "lr_scheduler", ("did you mean 'cosine'",)),
    "v2 on a v1 model": ("v2 = true", "v2", ("remove v2",)),
    "v-prediction on an epsilon model": ("v_parameterization = true", "v_parameterization", ("remove",)),
    "xformers without CUDA": ("xformers = true", "xformers", ("remove it",)),
    "full_fp16 without fp16": ("full_fp16 = true", "full_fp16", ("mixed_precision = 'fp16'",)),
    "full_bf16 without bf16": ("full_bf16 = true", "full_bf16", ("mixed_precision = 'bf16'",)),
    "fp16 without CUDA": ('mixed_precision = "fp16"', "mixed_precision", ("'bf16' or 'no'",)),
    "te rate without te": ("learning_rate_te = 1e-5", "learning_rate_te", ("train_text_encoder = true",)),
    "both noises": ("noise_offset = 0.1\nmultires_noise_iterations = 6", "noise_offset", ("choose one",)),
    "timesteps reversed": ("min_timestep = 900\nmax_timestep = 100", "min_timestep", ("min < max",)),
    "ema decay without ema": ("ema_decay = 0.9", "ema_decay", ("use_ema = true",)),
    "pruning without saves": ("save_last_n_steps = 2", "save_last_n_steps", ("needs save_every_n_steps",)),
    "missing vae": ('vae = "{tmp}/no-vae.safetensors"', "vae", ("does not exist",)),
    "missing resume": ('resume = "{tmp}/no-state"', "resume", ("does not exist",)),
    "output_dir is a file": ("", "output_dir", ("name a folder",)),
    "logging_dir is a file": ('logging_dir = "{tmp}/file.txt"', "logging_dir", ("name a folder",)),
    "safetensors vs ckpt": ('use_safetensors = true\nsave_model_as = "ckpt"', "use_safetensors", ("remove one",)),
    "unknown subset key": ("", "datasets[0].subsets[0].flipaug", ("did you mean 'flip_aug'",)),
    # Before: passed validation and failed at the end of the run, when the model was saved.
    "output_name with NUL": ('output_name = "m\\u0000x"', "output_name", ("control characters",)),
    "output_name too long": (f'output_name = "{"m" * 240}"', "output_name", ("shorten it",)),
    # Before: accepted, then the first sample (a 51200×512 image) ended the run hours in.
    "oversized sample": (
        'sample_prompts = "{tmp}/big.txt"\nsample_every_n_steps = 100',
        "sample_prompts",
        ("between 8 and 4096",),
    ),
}
SUBSET = {"unknown subset key": {"flipaug": True}}
OUTPUT_DIR = {"output_dir is a file": "file.txt"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line_naming_the_key_and_the_fix_before_the_model_loads(
    case, cli, tmp_path, junk_models, data
):
    text, key, fix = CASES[case]
    (tmp_path / "file.txt").write_text("not a folder\n", encoding="utf-8")
    (tmp_path / "big.txt").write_text("a cat --w 51200 --h 512\n", encoding="utf-8")
    out = tmp_path / OUTPUT_DIR.get(case, "out")
    extra = text.format(tmp=tmp_path)
    cfg = write(tmp_path, junk_models["v1"], data, extra=extra, subset=SUBSET.get(case), out=out)
    result = cli("train", cfg)
    assert result.exit_code == 2, (case, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, (case, result.stderr)
    assert errors[0].startswith(f"error: {key}"), (case, errors[0])
    assert any(word in errors[0] for word in fix), (case, errors[0])
    assert "cannot load the model" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("where", "key"),
    [("metadata_file", "metadata_file"), ("image_dir", "image_dir"), ("model", "pretrained_model_name_or_path")],
)
def test_missing_files_and_folders_are_named(where, key, cli, tmp_path, junk_models, data):
    images, meta = data
    paths = {"meta": meta, "images": images, "model": junk_models["v1"]}
    paths[{"metadata_file": "meta", "image_dir": "images", "model": "model"}[where]] = tmp_path / "nowhere" / "x"
    cfg = write(tmp_path, paths.pop("model"), (paths["images"], paths["meta"]))
    result = cli("train", cfg)
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0] and str(tmp_path / "nowhere" / "x") in errors[0], result.stderr
    assert "does not exist" in errors[0] or "not found" in errors[0], errors[0]


def test_v2_false_on_a_v2_model_is_refused_before_it_loads(cli, tmp_path, junk_models, data):
    result = cli("train", write(tmp_path, junk_models["v2"], data, extra="v2 = false"))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: v2: v2 = false contradicts the model"), result.stderr
    assert "which is SD v2; remove v2" in result.stderr
    ok = cli("train", write(tmp_path, junk_models["v2"], data, extra="v2 = true\nv_parameterization = true"))
    assert ok.exit_code == 1 and "cannot load the model" in ok.stderr, ok.stderr  # the right flags pass the check


def test_every_problem_is_listed_at_once(cli, tmp_path, junk_models, data):
    cfg = write(tmp_path, junk_models["v1"], data, extra='lr_scheduler = "cosin"\nfull_fp16 = true\nv2 = true')
    result = cli("train", cfg)
    assert result.exit_code == 2
    errors = [line.split(":")[1].strip() for line in result.stderr.splitlines() if line.startswith("error:")]
    assert sorted(errors) == ["full_fp16", "lr_scheduler", "v2"], result.stderr


def test_validating_optimizer_type_imports_nothing(sdtool_proc, tmp_path, junk_models, data):
    """Before: finding `pkg.mod.Class` imported (ran) `pkg` while the config was only being checked."""
    package = tmp_path / "site" / "evilpkg"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "optim.py").write_text("class Evil: ...\n")
    cfg = write(tmp_path, junk_models["v1"], data, extra='optimizer_type = "evilpkg.optim.Evil"')
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tmp_path / "site")])}
    result = sdtool_proc("train", cfg, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    assert 'optimizer_type = "evilpkg.optim.Evil"' in result.stdout
    assert not marker.exists(), "validating the config ran the optimizer's package"
    missing = sdtool_proc("train", write(tmp_path, junk_models["v1"], data, extra='optimizer_type = "nopkg.X"'))
    assert missing.returncode == 2 and "error: optimizer_type: cannot find the package 'nopkg'" in missing.stderr
