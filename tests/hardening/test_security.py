"""Secure by default: pickles refused unless asked, no code-running calls in the source, file names are only names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from sdtool.metadata import read_metadata
from sdtool.models.families.sd1 import SD1
from tests.conftest import REPO_ROOT
from tests.imagegen import save_rgb

# ------------------------------------------------------------------------------------------- pickled checkpoints


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A .ckpt whose unpickling would create `marker` (the classic `__reduce__` payload)."""
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "payload": Payload()}, path)
    return path


@pytest.mark.slow
def test_pickle_payload_never_runs(tmp_path, sdtool_proc):
    marker = tmp_path / "payload-ran"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out.safetensors"
    result = sdtool_proc("convert", evil, out)
    assert result.returncode == 1, result.stderr
    assert "--allow-pickle" in result.stderr and result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_allow_pickle_loads_a_benign_full_pickle(tmp_path, cli, tiny_v1):
    import argparse

    import torch

    from sdtool.models.checkpoint import read_checkpoint
    from sdtool.models.loading import load_model
    from sdtool.models.saving import save_single_file

    model = load_model(tiny_v1, components=("unet", "vae", "text_encoder"))
    state, _ = read_checkpoint(save_single_file(model, tmp_path / "tiny.safetensors", family=SD1, v_prediction=False))
    ckpt = tmp_path / "trusted.ckpt"
    # argparse.Namespace is what old training scripts saved beside the weights: harmless, but not weights-only.
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, ckpt)

    refused = cli("convert", ckpt, tmp_path / "a.safetensors", "--config", tiny_v1)
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "a.safetensors").exists()

    loaded = cli("convert", ckpt, tmp_path / "b.safetensors", "--config", tiny_v1, "--allow-pickle")
    assert loaded.exit_code == 0, loaded.stderr
    assert "--allow-pickle" in loaded.stderr  # the warning that full unpickling runs code
    assert loaded.stdout.strip() == str(tmp_path / "b.safetensors")
    converted, _ = read_checkpoint(tmp_path / "b.safetensors")
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------- the source itself

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}

# Uses that are justified, keyed by file and the stripped source line (so moving code does not break the list).
ALLOWED = {
    (
        "sdtool/models/checkpoint.py",
        'obj = torch.load(path, map_location="cpu", weights_only=False)',
    ): "only reached with --allow-pickle, after weights_only=True refused the file, with a warning",
}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def find_unsafe_calls(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, what) for each call that can run code from data or through a shell."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append((node.lineno, f"{func.id}("))
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner, attr = func.value.id, func.attr
            if owner in PICKLE_MODULES and attr in ("load", "loads", "Unpickler"):
                found.append((node.lineno, f"{owner}.{attr}"))
            if owner == "torch" and attr == "load" and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                found.append((node.lineno, "torch.load( without weights_only=True"))
            if (owner, attr) in SHELL_CALLS:
                found.append((node.lineno, f"{owner}.{attr}"))
        if "trust_remote_code" in keywords and _is_true(keywords["trust_remote_code"]):
            found.append((node.lineno, "trust_remote_code=True"))
        if "shell" in keywords and _is_true(keywords["shell"]):
            found.append((node.lineno, "shell=True"))
    return found


def test_scanner_finds_every_pattern():
    sample = "\n".join(
        [
            "eval('1')",
            "exec('x = 1')",
            "pickle.load(f)",
            "torch.load(p)",
            "torch.load(p, weights_only=False)",
            "AutoModel.from_pretrained(x, trust_remote_code=True)",
            "subprocess.run(cmd, shell=True)",
            "os.system('ls')",
            "model.eval()",  # a method, not the builtin
            "torch.load(p, map_location='cpu', weights_only=True)",
            "AutoModel.from_pretrained(x, trust_remote_code=trust_remote_code)",  # passed through from a flag
        ]
    )
    assert [line for line, _ in find_unsafe_calls(sample, "sample.py")] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_no_unsafe_calls_in_sdtool():
    problems, used = [], set()
    for path in sorted((REPO_ROOT / "sdtool").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, what in find_unsafe_calls("\n".join(lines), rel):
            key = (rel, lines[lineno - 1].strip())
            if key in ALLOWED:
                used.add(key)
                continue
            problems.append(f"{rel}:{lineno}: {what}: {lines[lineno - 1].strip()}")
    assert not problems, "unsafe calls (justify them in ALLOWED or remove them):\n" + "\n".join(problems)
    assert used == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - used}"


# ------------------------------------------------------------------------------------------- names are only names

HOSTILE_NAMES = ["$(touch pwned).png", "`touch pwned`.png", "x; touch pwned #.png", "a && touch pwned.png", "-rf.png"]
HOSTILE_KEYS = {
    "../../escape/$(touch pwned).png": {"caption": "dots and a command"},
    "a/../../../etc/passwd.png": {"caption": "climbs out"},
    "`touch pwned` (no such image)": {"caption": "a stem-only key that names no image"},
}


def _pwned(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*pwned*") if p.name == "pwned" or p.name.startswith("pwned")]


@pytest.mark.slow
def test_hostile_file_names_and_keys_are_only_paths(tmp_path, sdtool_proc, cli, tiny_tagger):
    work = tmp_path / "work"  # the commands' working directory: a payload would create `pwned` here
    images = tmp_path / "images"
    work.mkdir()
    for i, name in enumerate(HOSTILE_NAMES):
        save_rgb(images / name, 20 + i, 24, seed=i)
        (images / name).with_suffix(".caption").write_text(f"caption {i} $(touch pwned)\n", encoding="utf-8")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(HOSTILE_KEYS), encoding="utf-8")

    bucket = sdtool_proc("bucket", images, "-o", meta, "--update", "--json", cwd=work)
    assert bucket.returncode == 0, bucket.stderr
    records = [json.loads(line) for line in bucket.stdout.splitlines()]
    assert sorted(r["path"] for r in records) == sorted(str(images / n) for n in HOSTILE_NAMES)
    written = read_metadata(meta)
    for key, fields in HOSTILE_KEYS.items():  # kept verbatim, neither resolved nor run
        assert written[key] == fields
    for i, name in enumerate(HOSTILE_NAMES):
        assert written[str(images / name)]["caption"] == f"caption {i} $(touch pwned)"

    # In-process from here on: a payload would land in this process's working directory, scanned below too.
    tag = cli("tag", images, "-m", tiny_tagger, "--workers", "0", "--output-path", meta)
    assert tag.exit_code == 0, tag.stderr
    tagged = read_metadata(meta)
    for key, fields in HOSTILE_KEYS.items():
        assert tagged[key] == fields
    assert all(tagged[str(images / name)]["tags"] for name in HOSTILE_NAMES)

    sidecars = cli("tag", images, "-m", tiny_tagger, "--workers", "0")
    assert sidecars.exit_code == 0, sidecars.stderr
    assert sorted(sidecars.stdout.splitlines()) == sorted(str((images / n).with_suffix(".txt")) for n in HOSTILE_NAMES)

    assert _pwned(work, images, tmp_path, REPO_ROOT, Path.cwd()) == []
    assert not (tmp_path.parent / "escape").exists()
