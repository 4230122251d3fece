"""`sdtool bucket` through the CLI: metadata contents, stdout/stderr, exit codes, sidecars, bad files, updates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdtool.metadata import ImageResolver, read_metadata
from tests import imagegen

SETTINGS_512 = {
    "resolution": [512, 512],
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
}


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory) -> Path:
    """The worked cases of CONTRACT §E plus an EXIF-rotated photo, with some sidecars (generated once)."""
    d = tmp_path_factory.mktemp("bucket") / "imgs"
    d.mkdir()
    imagegen.save_rgb(d / "wide.jpg", 1920, 1080)
    imagegen.save_rgb(d / "pano.jpg", 3000, 1000)
    imagegen.save_rgb(d / "small.png", 300, 200)
    imagegen.save_rgb(d / "tall.webp", 1024, 1536)
    imagegen.save_exif_rotated(d / "rotated.jpg", 300, 200, orientation=6)  # displayed 200×300
    (d / "wide.caption").write_text("  a wide street at dusk \n", encoding="utf-8")
    (d / "wide.txt").write_text("street, dusk\n", encoding="utf-8")
    (d / "small.txt").write_text("\ufeffflower, macro\n", encoding="utf-8")  # BOM from a Windows editor
    return d


@pytest.fixture
def dataset(dataset_template, tmp_path) -> Path:
    """A private copy of the template, so each test may add files to it."""
    return Path(shutil.copytree(dataset_template, tmp_path / "imgs"))


# (size, bucket, resized, crop) for the images above at 512², from the reference table.
EXPECTED = {
    "wide.jpg": ([1920, 1080], [640, 384], [683, 384], [21, 0, 661, 384]),
    "pano.jpg": ([3000, 1000], [832, 256], [832, 277], [0, 10, 832, 266]),
    "small.png": ([300, 200], [640, 384], [640, 427], [0, 21, 640, 405]),
    "tall.webp": ([1024, 1536], [384, 640], [427, 640], [21, 0, 405, 640]),
    "rotated.jpg": ([200, 300], [384, 640], [427, 640], [21, 0, 405, 640]),
}


def test_writes_metadata_with_absolute_keys(cli, dataset, tmp_path):
    out = tmp_path / "meta.json"
    result = cli("bucket", dataset, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    meta = read_metadata(out)
    assert sorted(meta) == sorted(str(dataset.absolute() / name) for name in EXPECTED)
    for name, (size, bucket, resized, crop) in EXPECTED.items():
        entry = meta[str(dataset.absolute() / name)]
        assert entry["image_size"] == size, name
        assert entry["train_resolution"] == bucket, name
        assert entry["resized_size"] == resized, name
        assert entry["crop_ltrb"] == crop, name
        assert entry["bucket_settings"] == SETTINGS_512
    wide = meta[str(dataset.absolute() / "wide.jpg")]
    assert wide["caption"] == "a wide street at dusk" and wide["tags"] == "street, dusk"
    small = meta[str(dataset.absolute() / "small.png")]
    assert small["tags"] == "flower, macro" and "caption" not in small
    assert "caption" not in meta[str(dataset.absolute() / "pano.jpg")]
    assert "tags" not in meta[str(dataset.absolute() / "pano.jpg")]
    # kohya readers: every top-level value is an image entry, written with indent 2 and UTF-8 as is.
    raw = json.loads(out.read_text(encoding="utf-8"))
    assert all(isinstance(v, dict) and "image_size" in v for v in raw.values())
    assert out.read_text(encoding="utf-8").startswith('{\n  "')


def test_table_on_stderr(cli, dataset, tmp_path):
    result = cli("bucket", dataset, "-o", tmp_path / "m.json")
    err = result.stderr
    assert "640x384" in err and "384x640" in err and "832x256" in err
    assert "bucketed 5 images" in err
    # 640x384 holds wide (not upscaled) and small (upscaled 640/300 = 2.13×).
    row = next(line for line in err.splitlines() if "640x384" in line)
    assert "2.13×" in row
    assert "mean aspect error" in err


def test_json_lines(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == sorted(EXPECTED)
    for r in records:
        size, bucket, resized, crop = EXPECTED[Path(r["path"]).name]
        assert (r["size"], r["bucket"], r["resized"], r["crop"]) == (size, bucket, resized, crop)
        assert r["key"] == str(Path(r["path"]).absolute())
    small = next(r for r in records if r["path"].endswith("small.png"))
    assert small["upscaled"] is True and small["scale"] == pytest.approx(640 / 300, abs=1e-6)
    assert out.exists()


def test_exif_rotated_gets_displayed_size(cli, tmp_path):
    d = tmp_path / "rot"
    d.mkdir()
    imagegen.save_exif_rotated(d / "portrait.jpg", 1920, 1080, orientation=6)  # stored landscape, shown portrait
    result = cli("bucket", d, "-o", tmp_path / "m.json", "--json")
    record = json.loads(result.stdout)
    assert record["size"] == [1080, 1920]
    assert record["bucket"] == [384, 640]
    meta = read_metadata(tmp_path / "m.json")
    assert meta[str((d / "portrait.jpg").absolute())]["image_size"] == [1080, 1920]


def test_bad_files_are_skipped_and_named(cli, dataset, tmp_path):
    (dataset / "empty.png").write_bytes(b"")
    (dataset / "notes.jpg").write_text("not an image at all")
    imagegen.save_png_header_claiming(dataset / "bomb.png", 60000, 60000)
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out)
    assert result.exit_code == 0, result.output
    for name, reason in (("empty.png", "empty file"), ("notes.jpg", "not an image"), ("bomb.png", "bomb")):
        line = next(line for line in result.stderr.splitlines() if line.startswith(f"skipped {dataset / name}"))
        assert reason in line
    assert "skipped 3" in result.stderr
    assert len(read_metadata(out)) == len(EXPECTED)


def test_strict_exits_1_after_writing_the_good_ones(cli, dataset, tmp_path):
    (dataset / "empty.png").write_bytes(b"")
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--strict")
    assert result.exit_code == 1
    assert "error:" in result.stderr and "--strict" in result.stderr
    assert len(read_metadata(out)) == len(EXPECTED)
    assert result.stdout.strip() == str(out)


def test_strict_without_skips_is_fine(cli, dataset, tmp_path):
    assert cli("bucket", dataset, "-o", tmp_path / "m.json", "--strict").exit_code == 0


def test_unreadable_sidecar_keeps_the_image(cli, dataset, tmp_path):
    (dataset / "pano.caption").write_bytes(b"\xff\xfe\x00bad")
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out)
    assert result.exit_code == 0
    assert f"skipped {dataset / 'pano.caption'}: not UTF-8" in result.stderr
    entry = read_metadata(out)[str(dataset.absolute() / "pano.jpg")]
    assert "caption" not in entry and entry["train_resolution"] == [832, 256]
    assert cli("bucket", dataset, "-o", out, "--overwrite", "--strict").exit_code == 1


def test_custom_sidecar_extensions(cli, dataset, tmp_path):
    (dataset / "pano.cap").write_text("mountains\n", encoding="utf-8")
    (dataset / "pano.tags").write_text("landscape\n", encoding="utf-8")
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--caption-extension", "cap", "--tags-extension", ".tags")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    pano = meta[str(dataset.absolute() / "pano.jpg")]
    assert pano["caption"] == "mountains" and pano["tags"] == "landscape"
    assert "caption" not in meta[str(dataset.absolute() / "wide.jpg")]  # wide.caption is not a .cap file


@pytest.mark.parametrize(
    "args",
    [
        ["--caption-extension", ".txt"],  # same as the tags extension
        ["--tags-extension", ".png"],
        ["--caption-extension", ""],
    ],
)
def test_bad_sidecar_extensions(cli, dataset, tmp_path, args):
    result = cli("bucket", dataset, "-o", tmp_path / "m.json", *args)
    assert result.exit_code == 2
    assert not (tmp_path / "m.json").exists()


def test_existing_output_needs_update_or_overwrite(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    out.write_text('{"/elsewhere/x.png": {"caption": "keep me"}}', encoding="utf-8")
    before = out.read_text(encoding="utf-8")
    result = cli("bucket", dataset, "-o", out)
    assert result.exit_code == 2
    assert "--update" in result.stderr and "--overwrite" in result.stderr
    assert out.read_text(encoding="utf-8") == before
    assert cli("bucket", dataset, "-o", out, "--update", "--overwrite").exit_code == 2
    result = cli("bucket", dataset, "-o", out, "--overwrite")
    assert result.exit_code == 0
    assert "/elsewhere/x.png" not in read_metadata(out)


def test_update_keeps_fields_and_entries(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    wide, pano = str(dataset.absolute() / "wide.jpg"), str(dataset.absolute() / "pano.jpg")
    existing = {
        "/elsewhere/x.png": {"caption": "another dataset", "image_size": [10, 10]},
        pano: {"caption": "from the captioner", "score": 7, "train_resolution": [1, 1]},
        wide: {"caption": "old caption"},
    }
    out.write_text(json.dumps(existing), encoding="utf-8")
    result = cli("bucket", dataset, "-o", out, "--update")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["/elsewhere/x.png"] == existing["/elsewhere/x.png"]
    # No sidecar: the caption already there stays; unknown fields stay; bucket fields are refreshed.
    assert meta[pano]["caption"] == "from the captioner" and meta[pano]["score"] == 7
    assert meta[pano]["train_resolution"] == [832, 256]
    # A sidecar wins over the old text.
    assert meta[wide]["caption"] == "a wide street at dusk"
    assert list(meta)[:3] == ["/elsewhere/x.png", pano, wide]  # existing order kept, new entries after
    assert len(meta) == 1 + len(EXPECTED)


def test_update_moves_old_key_forms_to_the_new_key(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    # kohya's merge scripts wrote stem keys; a tagger wrote a relative key.
    out.write_text(json.dumps({"pano": {"caption": "stem key"}, "tall.webp": {"tags": "relative key"}}))
    result = cli("bucket", dataset, "-o", out, "--update")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert "pano" not in meta and "tall.webp" not in meta
    assert meta[str(dataset.absolute() / "pano.jpg")]["caption"] == "stem key"
    assert meta[str(dataset.absolute() / "tall.webp")]["tags"] == "relative key"
    assert len(meta) == len(EXPECTED)


def test_update_with_relative_moves_absolute_keys(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    cli("bucket", dataset, "-o", out)
    meta = read_metadata(out)
    meta[str(dataset.absolute() / "pano.jpg")]["caption"] = "edited by hand"
    out.write_text(json.dumps(meta), encoding="utf-8")
    result = cli("bucket", dataset, "-o", out, "--update", "--relative")
    assert result.exit_code == 0, result.output
    assert "now use relative keys" in result.stderr
    meta = read_metadata(out)
    assert sorted(meta) == sorted(EXPECTED)
    assert meta["pano.jpg"]["caption"] == "edited by hand"


def test_update_creates_a_missing_file(cli, dataset, tmp_path):
    out = tmp_path / "new.json"
    result = cli("bucket", dataset, "-o", out, "--update")
    assert result.exit_code == 0
    assert len(read_metadata(out)) == len(EXPECTED)


def test_update_refuses_a_broken_file(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    out.write_text("{not json", encoding="utf-8")
    result = cli("bucket", dataset, "-o", out, "--update")
    assert result.exit_code == 1
    assert "not valid JSON" in result.stderr
    assert out.read_text(encoding="utf-8") == "{not json"


def test_relative_keys_resolve_with_image_resolver(cli, dataset, tmp_path):
    imagegen.save_rgb(dataset / "sub" / "deep.png", 512, 512)
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--relative", "--recursive")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert sorted(meta) == sorted([*EXPECTED, "sub/deep.png"])
    resolver = ImageResolver(dataset)
    for key in meta:
        assert resolver.resolve(key).is_file()
    assert meta["sub/deep.png"]["train_resolution"] == [512, 512]


def test_relative_needs_one_folder(cli, dataset, tmp_path):
    other = tmp_path / "other"
    imagegen.save_rgb(other / "o.png", 64, 64)
    result = cli("bucket", dataset, other, "-o", tmp_path / "m.json", "--relative")
    assert result.exit_code == 2
    assert "one DIR" in result.stderr
    # Without --relative several folders are fine (keys are absolute, so they cannot collide).
    result = cli("bucket", dataset, other, "-o", tmp_path / "m.json")
    assert result.exit_code == 0
    assert len(read_metadata(tmp_path / "m.json")) == len(EXPECTED) + 1


def test_recursive_flag(cli, dataset, tmp_path):
    imagegen.save_rgb(dataset / "sub" / "deep.png", 64, 64)
    cli("bucket", dataset, "-o", tmp_path / "a.json")
    assert len(read_metadata(tmp_path / "a.json")) == len(EXPECTED)
    cli("bucket", dataset, "-o", tmp_path / "b.json", "-r")
    assert len(read_metadata(tmp_path / "b.json")) == len(EXPECTED) + 1


def test_jsonl_output(cli, dataset, tmp_path):
    out = tmp_path / "m.jsonl"
    result = cli("bucket", dataset, "-o", out)
    assert result.exit_code == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(EXPECTED)
    assert all("image_path" in obj and "train_resolution" in obj for obj in lines)
    assert read_metadata(out)[str(dataset.absolute() / "wide.jpg")]["caption"] == "a wide street at dusk"


def test_no_upscale(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--no-upscale")
    assert result.exit_code == 0
    meta = read_metadata(out)
    small = meta[str(dataset.absolute() / "small.png")]
    assert small["train_resolution"] == [256, 192] and small["resized_size"] == [300, 200]
    assert small["bucket_settings"]["bucket_no_upscale"] is True
    assert "outside 256–1024" in result.stderr  # kohya silently ignores the limits here; we say so


def test_other_resolution_and_degenerate_warning(cli, dataset, tmp_path):
    out = tmp_path / "m.json"
    result = cli("bucket", dataset, "-o", out, "--resolution", "1024")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "--max-bucket-reso 2048" in result.stderr
    assert read_metadata(out)[str(dataset.absolute() / "small.png")]["train_resolution"] == [1024, 704]
    result = cli("bucket", dataset, "-o", out, "--resolution", "1024", "--max-bucket-reso", "2048", "--overwrite")
    assert "warning:" not in result.stderr
    meta = read_metadata(out)
    assert meta[str(dataset.absolute() / "wide.jpg")]["train_resolution"] == [1344, 768]
    assert meta[str(dataset.absolute() / "wide.jpg")]["bucket_settings"]["max_bucket_reso"] == 2048


def test_width_height_resolution(cli, dataset, tmp_path):
    result = cli("bucket", dataset, "-o", tmp_path / "m.json", "--resolution", "768,512", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["key"]
    meta = read_metadata(tmp_path / "m.json")
    assert next(iter(meta.values()))["bucket_settings"]["resolution"] == [768, 512]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resolution", "big"], "--resolution"),
        (["--bucket-reso-steps", "60"], "multiple of 8"),
        (["--min-bucket-reso", "640"], "must contain the resolution"),
        (["--max-bucket-reso", "448"], "must contain the resolution"),
    ],
)
def test_usage_errors(cli, dataset, tmp_path, args, message):
    result = cli("bucket", dataset, "-o", tmp_path / "m.json", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "m.json").exists()


def test_steps_not_multiple_of_64_warn_and_limits_round(cli, dataset, tmp_path):
    result = cli("bucket", dataset, "-o", tmp_path / "m.json", "--bucket-reso-steps", "32", "--max-bucket-reso", "1000")
    assert result.exit_code == 0, result.output
    assert "not a multiple of 64" in result.stderr
    assert "1000 → 1024" in result.stderr
    entry = next(iter(read_metadata(tmp_path / "m.json").values()))
    assert entry["bucket_settings"]["bucket_reso_steps"] == 32
    assert entry["bucket_settings"]["max_bucket_reso"] == 1024


def test_missing_folder_and_empty_folder(cli, tmp_path):
    # Usage errors (exit 2) like on every command (tests/cli/test_conventions.py holds them all to it).
    result = cli("bucket", tmp_path / "nope", "-o", tmp_path / "m.json")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = cli("bucket", tmp_path / "empty", "-o", tmp_path / "m.json")
    assert result.exit_code == 2 and "no images in" in result.stderr
    assert not (tmp_path / "m.json").exists()
    (tmp_path / "empty" / "sub" / "a.png").write_bytes(b"")
    result = cli("bucket", tmp_path / "empty", "-o", tmp_path / "m.json")
    assert result.exit_code == 2 and "1 image is in sub-folders: add --recursive" in result.stderr


def test_quiet_hides_table_but_not_skips(cli, dataset, tmp_path):
    (dataset / "empty.png").write_bytes(b"")
    result = cli("-q", "bucket", dataset, "-o", tmp_path / "m.json")
    assert result.exit_code == 0
    assert "skipped" in result.stderr
    assert "mean aspect error" not in result.stderr


def test_workers_do_not_change_the_result(cli, dataset, tmp_path):
    cli("bucket", dataset, "-o", tmp_path / "a.json", "--workers", "0")
    cli("bucket", dataset, "-o", tmp_path / "b.json", "--workers", "8")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_sdxl_defaults_and_explicit_options_win(cli, tmp_path):
    from tests.imagegen import save_rgb

    save_rgb(tmp_path / "a.png", 2000, 1000)
    out = tmp_path / "m.json"
    result = cli("bucket", tmp_path, "-o", out, "--sdxl", "--json")
    assert result.exit_code == 0, result.stderr
    assert "buckets for 1024x1024, sides 512–2048" in result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["bucket"] == [1408, 704]  # kohya's bucket for 2:1 at 1024², 64-step sides up to 2048
    again = cli("bucket", tmp_path, "-o", out, "--sdxl", "--max-bucket-reso", "1024", "--overwrite")
    assert again.exit_code == 0 and "sides 512–1024" in again.stderr
