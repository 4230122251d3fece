"""CONTRACT §D: kohya's JSON and JSONL forms, key resolution (absolute, relative, stem-only), merge, atomic write."""

from __future__ import annotations

import json

import pytest

from sdtool.errors import InputError
from sdtool.metadata import ImageResolver, merge_metadata, metadata_key, read_metadata, write_metadata
from tests import imagegen


def test_json_round_trip_keeps_unicode_and_unknown_fields(tmp_path):
    data = {"/d/ä b.png": {"caption": "ein Hund", "tags": "1girl", "image_size": [3, 4], "custom": {"x": 1}}}
    path = write_metadata(tmp_path / "meta.json", data)
    assert "ä b.png" in path.read_text(encoding="utf-8")
    assert read_metadata(path) == data


def test_jsonl_round_trip_and_kohya_jsonl(tmp_path):
    data = {"a.png": {"caption": "x", "image_size": [1, 2]}, "b.png": {"tags": "y"}}
    path = write_metadata(tmp_path / "meta.jsonl", data)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"image_path": "a.png", "caption": "x", "image_size": [1, 2]}
    assert read_metadata(path) == data
    # JSONL content under a .json name is still recognised
    other = tmp_path / "other.json"
    other.write_text(path.read_text())
    assert read_metadata(other) == data


@pytest.mark.parametrize(
    ("content", "reason"),
    [("", "empty"), ("[1, 2]", "JSON object"), ("{bad", "not valid JSON"), ('{"a": 1}', "not an object")],
)
def test_bad_metadata_is_named(tmp_path, content, reason):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(InputError, match=reason):
        read_metadata(path)


def test_merge_keeps_untouched_fields_and_entries():
    merged = merge_metadata({"a": {"caption": "c", "x": 1}, "b": {"y": 2}}, {"a": {"caption": "new"}, "c": {}})
    assert merged == {"a": {"caption": "new", "x": 1}, "b": {"y": 2}, "c": {}}


def test_keys_absolute_and_relative(tmp_path):
    img = imagegen.save_rgb(tmp_path / "sub" / "x.png", 4, 4)
    assert metadata_key(img, tmp_path, relative=False) == str(img.absolute())
    assert metadata_key(img, tmp_path, relative=True) == "sub/x.png"


def test_resolver(tmp_path):
    imagegen.save_rgb(tmp_path / "a.png", 4, 4)
    imagegen.save_rgb(tmp_path / "b.JPG", 4, 4)
    imagegen.save_rgb(tmp_path / "dup.png", 4, 4)
    imagegen.save_rgb(tmp_path / "dup.webp", 4, 4)
    r = ImageResolver(tmp_path)
    assert r.resolve("a.png") == tmp_path / "a.png"
    assert r.resolve(str(tmp_path / "a.png")) == tmp_path / "a.png"
    assert r.resolve("a") == tmp_path / "a.png"
    assert r.resolve("b") == tmp_path / "b.JPG"
    with pytest.raises(InputError, match=r"ambiguous: .*dup\.png and .*dup\.webp"):
        r.resolve("dup")
    with pytest.raises(InputError, match="no image found"):
        r.resolve("missing")
    with pytest.raises(InputError, match="no image folder"):
        ImageResolver(None).resolve("a.png")
