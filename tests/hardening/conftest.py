"""Hardening fixtures: the bad-input corpus, tiny labelling models, and helpers that check a run over the corpus."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdtool.fsutil import leftover_temp_files
from tests.hardening.corpus import Corpus, Expectation, build_corpus, unexpected_files

SKIP_LINE = re.compile(r"^skipped (.+?): (.+)$")


@pytest.fixture
def corpus(tmp_path) -> Corpus:
    """A fresh copy of the bad-input corpus under tmp_path/corpus (cheap to build: tiny files)."""
    return build_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    from sdtool.label.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("hardening") / "blip")


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory) -> Path:
    """A WD14-layout ONNX tagger whose probabilities depend on the mean colour of the input (16×16 NHWC)."""
    from tests.label.conftest import save_wd14_tagger

    return save_wd14_tagger(tmp_path_factory.mktemp("hardening") / "wd14")


def skip_lines(stderr: str) -> dict[str, str]:
    """path → reason for every `skipped <path>: <reason>` line on stderr."""
    found = {}
    for line in stderr.splitlines():
        match = SKIP_LINE.match(line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def check_skips(
    stderr: str, expected: Expectation, extra: dict[Path, tuple[str, ...]] | None = None, strict: bool = False
) -> None:
    """Every bad file is named once with a sensible reason; no good file is named; nothing else is skipped.

    With `strict`, the last line must be the one `error:` line that names --strict; otherwise there is no error.
    """
    if strict:
        lines = stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and "--strict" in lines[-1], lines[-1]
        stderr = "\n".join(lines[:-1])
    named = skip_lines(stderr)
    wanted = {str(path): words for path, words in {**expected.bad, **(extra or {})}.items()}
    missing = sorted(set(wanted) - set(named))
    assert not missing, f"bad inputs not named on stderr: {missing}\n{stderr}"
    for path, words in wanted.items():
        reason = named[path].lower()
        assert any(w.lower() in reason for w in words), f"{path}: reason {named[path]!r} mentions none of {words}"
    surplus = sorted(set(named) - set(wanted))
    assert not surplus, f"skipped files that should have been processed: {surplus}\n{stderr}"
    assert "Traceback" not in stderr
    assert "error:" not in stderr


def check_tree(corpus: Corpus, before: dict[str, str], allowed_new: set[str]) -> None:
    """No temporary file left, no input changed or removed, nothing written but `allowed_new` (rel paths)."""
    assert leftover_temp_files(corpus.root) == []
    assert unexpected_files(before, corpus.snapshot(), allowed_new) == []
