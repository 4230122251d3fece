"""Every command that walks images, over the bad-input corpus (CONTRACT §B, §C).

Each run must process every good file (checked file by file), name every bad one on stderr as
`skipped <path>: <reason>` with a sensible reason, exit 0 (1 with `--strict`), change no input, and leave nothing
behind but its outputs: no temporary file, no half-written file, nothing unexpected.

Header-only `bucket` accepts images whose pixel data is broken (truncated JPEG, corrupt PNG data): their headers
are fine and `cache` finds them later. The decoding commands (`caption`, `tag`) skip them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdtool.metadata import read_metadata
from tests.hardening.conftest import check_skips, check_tree
from tests.hardening.corpus import Corpus


def rel(corpus: Corpus, path: Path) -> str:
    return path.relative_to(corpus.root).as_posix()


def sidecar(path: Path, ext: str) -> Path:
    return path.with_name(path.stem + ext)


# ------------------------------------------------------------------------------------------------------- bucket


def test_bucket_over_the_corpus(corpus, sdtool_proc, tmp_path):
    before = corpus.snapshot()
    out = tmp_path / "meta.json"
    result = sdtool_proc("bucket", corpus.root, "-r", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(out)]  # stdout is data: the written path only

    expected = corpus.expect("header")
    # Sidecars that are not UTF-8 are named too; their image is kept without that text.
    bad_sidecars = {corpus.path(s): ("not UTF-8",) for e in corpus.entries for s in e.bad_sidecars}
    check_skips(result.stderr, expected, extra=bad_sidecars)
    check_tree(corpus, before, allowed_new=set())  # bucket writes nothing beside the images

    meta = read_metadata(out)
    assert set(meta) == {str(p) for p in expected.good}
    for path, size in expected.good.items():
        entry = meta[str(path)]
        assert tuple(entry["image_size"]) == size, rel(corpus, path)
        bw, bh = entry["train_resolution"]
        rw, rh = entry["resized_size"]
        left, top, right, bottom = entry["crop_ltrb"]
        assert (right - left, bottom - top) == (bw, bh) and rw >= bw and rh >= bh, rel(corpus, path)
        e = corpus.entry(rel(corpus, path))
        assert entry.get("caption") == e.caption, rel(corpus, path)
        assert entry.get("tags") == e.tags, rel(corpus, path)
    # The truncated JPEG and the corrupt PNGs are in, with the sizes their headers give.
    assert tuple(meta[str(corpus.path("truncated.jpg"))]["image_size"]) == (64, 48)


def test_bucket_strict_exits_1_and_still_writes(corpus, sdtool_proc, tmp_path):
    out = tmp_path / "meta.jsonl"
    result = sdtool_proc("bucket", corpus.root, "-r", "-o", out, "--strict", "--json")
    assert result.returncode == 1, result.stderr
    expected = corpus.expect("header")
    bad_sidecars = {corpus.path(s): ("not UTF-8",) for e in corpus.entries for s in e.bad_sidecars}
    check_skips(result.stderr, expected, extra=bad_sidecars, strict=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["path"]: tuple(r["size"]) for r in records} == {str(p): s for p, s in expected.good.items()}
    assert set(read_metadata(out)) == {str(p) for p in expected.good}


def test_bucket_without_recursive_leaves_sub_folders_alone(corpus, cli, tmp_path):
    out = tmp_path / "meta.json"
    result = cli("bucket", corpus.root, "-o", out)
    assert result.exit_code == 0, result.stderr
    expected = corpus.expect("header", recursive=False)
    bad_sidecars = {corpus.path(s): ("UTF-8",) for s in corpus.entry("latin1.png").bad_sidecars}
    check_skips(result.stderr, expected, extra=bad_sidecars)
    assert set(read_metadata(out)) == {str(p) for p in expected.good}
    assert not any("sub" in k or "dir.png" in k for k in read_metadata(out))


def test_bucket_with_only_bad_images_names_them_and_writes_an_empty_file(tmp_path, cli):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("text", encoding="utf-8")
    result = cli("bucket", folder, "-o", tmp_path / "meta.json")
    # Nothing could be read: still exit 0 with the skips named, and a metadata file that says so (empty).
    assert "skipped" in result.stderr
    assert result.exit_code == 0, result.stderr
    assert read_metadata(tmp_path / "meta.json") == {}


# ------------------------------------------------------------------------------------------------------- tag


@pytest.mark.slow
def test_tag_over_the_corpus(corpus, sdtool_proc, tiny_tagger):
    before = corpus.snapshot()
    result = sdtool_proc("tag", corpus.root, "-r", "-m", tiny_tagger, "--json", "--workers", "1", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    expected = corpus.expect("pixels", sidecars=True)
    check_skips(result.stderr, expected)

    kept = {p for p in expected.good if rel(corpus, sidecar(p, ".txt")) in before}
    assert {rel(corpus, p) for p in kept} == {"plain.png", "latin1.png"}
    records = {r["path"]: r["tags"] for r in map(json.loads, result.stdout.splitlines())}
    written = set(expected.good) - kept
    assert set(records) == {str(p) for p in written}
    for path in written:
        text = sidecar(path, ".txt").read_text(encoding="utf-8")
        assert text == records[str(path)] + "\n" and "\n" not in text[:-1], rel(corpus, path)
    check_tree(corpus, before, allowed_new={rel(corpus, sidecar(p, ".txt")) for p in written})


@pytest.mark.slow
def test_tag_metadata_output_has_displayed_sizes(corpus, cli, tiny_tagger, tmp_path):
    before = corpus.snapshot()
    out = tmp_path / "tags.json"
    result = cli("tag", corpus.root, "-r", "-m", tiny_tagger, "--workers", "0", "--output-path", out, "--strict")
    assert result.exit_code == 1, result.stderr  # --strict: the bad files make it exit 1, after writing the rest
    expected = corpus.expect("pixels", sidecars=True)
    check_skips(result.stderr, expected, strict=True)
    meta = read_metadata(out)
    assert set(meta) == {os.path.abspath(p) for p in expected.good}
    for path, size in expected.good.items():
        assert tuple(meta[os.path.abspath(path)]["image_size"]) == size, rel(corpus, path)
        assert meta[os.path.abspath(path)]["tags"], rel(corpus, path)
    check_tree(corpus, before, allowed_new=set())


@pytest.mark.slow
def test_tag_append_skips_an_unreadable_tags_file(corpus, cli, tiny_tagger):
    result = cli("tag", corpus.root, "-m", tiny_tagger, "--workers", "0", "--append")
    assert result.exit_code == 0, result.stderr
    expected = corpus.expect("pixels", recursive=False, sidecars=True)
    latin1 = corpus.path("latin1.png")
    expected.good.pop(latin1)
    expected.bad[latin1] = ("not UTF-8",)
    check_skips(result.stderr, expected)
    assert corpus.path("latin1.txt").read_bytes() == "café, lait\n".encode("latin-1")  # left as it was
    assert corpus.path("plain.txt").read_text(encoding="utf-8").startswith("plain, picture, ")


# ------------------------------------------------------------------------------------------------------- caption


@pytest.mark.slow
def test_caption_over_the_corpus(corpus, sdtool_proc, cli, tiny_blip):
    before = corpus.snapshot()
    result = sdtool_proc(
        "caption", corpus.root, "-r", "-m", tiny_blip, "--json", "--workers", "1",
        "--max-length", "6", "--min-length", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = corpus.expect("pixels", sidecars=True)
    check_skips(result.stderr, expected)

    kept = {p for p in expected.good if rel(corpus, sidecar(p, ".caption")) in before}
    assert {rel(corpus, p) for p in kept} == {"plain.png", "ünï cödé.png", "sub/deeper/nested.png", "latin1.png"}
    records = {r["path"]: r["caption"] for r in map(json.loads, result.stdout.splitlines())}
    written = set(expected.good) - kept
    assert set(records) == {str(p) for p in written}
    for path in written:
        text = sidecar(path, ".caption").read_text(encoding="utf-8")
        assert text == records[str(path)] + "\n" and text.strip() and "\n" not in text[:-1], rel(corpus, path)
    check_tree(corpus, before, allowed_new={rel(corpus, sidecar(p, ".caption")) for p in written})

    # Again with --strict: the captions are kept, the bad files are tried again, named again, and make it exit 1.
    again = cli(
        "caption",
        corpus.root,
        "-r",
        "-m",
        tiny_blip,
        "--workers",
        "0",
        "--max-length",
        "3",
        "--min-length",
        "1",
        "--strict",
    )
    assert again.exit_code == 1
    check_skips(again.stderr, expected, strict=True)
    assert f"kept {len(expected.good)} existing .caption files" in again.stderr
