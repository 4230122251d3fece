"""`sdtool tag` on hand-predictable ONNX graphs: preprocessing, categories, thresholds, ordering and outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtool.label.tagger_model import TagInfo, deepdanbooru_input, wd14_input
from sdtool.label.tags import TagOptions, append_tags, select_tags
from tests.label.conftest import WD14_ROWS

# Expected tags worked out by hand from the logits in conftest.py.
# red.png 64×32 → square half red, half white → BGR means (0.5, 0.5, 1):
#   long_hair σ(7), ^_^ σ(5), blue_sky σ(0)=0.5, white_background σ(−1)=0.27;
#   character_b σ(5.5), character_a σ(0)=0.5; ratings: sensitive σ(3) beats general σ(0) and explicit σ(−3).
RED = ["long_hair", "^_^", "blue_sky", "character_b", "character_a"]
# blue.png 48×48 → means (1, 0, 0): blue_sky σ(6) only; rating general σ(0).
BLUE = ["blue_sky"]
# clear.png: transparent → white → means (1, 1, 1): long_hair σ(7), blue_sky σ(6), ^_^ σ(5), white_background σ(3);
#   character_a σ(6), character_b σ(5.5).
CLEAR = ["long_hair", "blue_sky", "^_^", "white_background", "character_a", "character_b"]


def read_tags(folder: Path, stem: str, ext: str = ".txt") -> str:
    return (folder / f"{stem}{ext}").read_text(encoding="utf-8")


def run_tag(cli, folder: Path, model: Path, *args: str):
    result = cli("tag", folder, "--model", model, "--workers", "0", *args)
    assert result.exit_code == 0, result.stderr
    return result


# ------------------------------------------------------------------------------------------- preprocessing (units)


def test_wd14_input_pads_white_centres_and_flips_to_bgr():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    array = wd14_input(image, 16, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.float32
    white, red_bgr = [255.0, 255.0, 255.0], [0.0, 0.0, 255.0]
    # 32 rows of padding split 16/16 → 4/4 rows after the ×4 reduction.
    assert np.all(array[:4] == white) and np.all(array[12:] == white)
    assert np.all(array[4:12] == red_bgr)


def test_wd14_input_odd_padding_goes_right_and_bottom():
    image = Image.new("RGB", (4, 1), (0, 0, 0))
    array = wd14_input(image, 4, 4)
    # 3 rows of padding: 1 above (3 // 2), 2 below.
    assert np.all(array[0] == 255) and np.all(array[1] == 0) and np.all(array[2:] == 255)


def test_wd14_input_upscales_small_images():
    array = wd14_input(Image.new("RGB", (8, 8), (10, 20, 30)), 16, 16)
    assert array.shape == (16, 16, 3)
    assert np.allclose(array, [30, 20, 10], atol=1)


def test_deepdanbooru_input_keeps_aspect_and_pads_with_edges():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 64, 16))  # top half red, bottom half black
    array = deepdanbooru_input(image, 16, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.float32 and array.max() <= 1.0
    assert np.allclose(array[0], [1, 0, 0]) and np.allclose(array[-1], [0, 0, 0])  # edges repeated, RGB


# ------------------------------------------------------------------------------------------- tag text (units)

TAGS = [TagInfo(name, category) for name, category in WD14_ROWS]
RED_PROBS = 1 / (1 + np.exp(-np.array([0, 3, 0, 0, 7, 5, 5.5, -1, -3], dtype=np.float64)))


def test_select_tags_orders_by_confidence_with_categories_from_the_csv():
    assert select_tags(RED_PROBS, TAGS, TagOptions()) == RED


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (TagOptions(character_tags_first=True), ["character_b", "character_a", "long_hair", "^_^", "blue_sky"]),
        (TagOptions(use_rating_tags=True), ["sensitive", *RED]),
        (TagOptions(remove_underscore=True), ["long hair", "^_^", "blue sky", "character b", "character a"]),
        (TagOptions(general_threshold=0.2), ["long_hair", "^_^", "blue_sky", "white_background", *RED[3:]]),
        (TagOptions(character_threshold=0.9), ["long_hair", "^_^", "blue_sky", "character_b"]),
        (TagOptions(general_threshold=1.1, character_threshold=1.1), []),
        (TagOptions(undesired_tags=("long hair", "character_a")), ["^_^", "blue_sky", "character_b"]),
        (
            TagOptions(remove_underscore=True, undesired_tags=("blue_sky",)),
            ["long hair", "^_^", "character b", "character a"],
        ),
        (
            TagOptions(always_first_tags=("blue_sky", "character_a"), use_rating_tags=True),
            ["blue_sky", "character_a", "sensitive", "long_hair", "^_^", "character_b"],
        ),
        (TagOptions(always_first_tags=("not_there", "^_^")), ["^_^", "long_hair", "blue_sky", *RED[3:]]),
    ],
)
def test_select_tags_options(options, expected):
    assert select_tags(RED_PROBS, TAGS, options) == expected


def test_append_keeps_existing_first_and_skips_duplicates_written_either_way():
    assert append_tags("1girl, long hair\n", ["long_hair", "smile", "1girl"], ", ") == ["1girl", "long hair", "smile"]
    assert append_tags("a|b", ["c", "a"], " | ") == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------- end to end


def test_tag_writes_sidecars_and_names_the_provider(cli, colour_images, wd14_tagger):
    result = run_tag(cli, colour_images, wd14_tagger)
    assert read_tags(colour_images, "red") == ", ".join(RED) + "\n"
    assert read_tags(colour_images, "blue") == ", ".join(BLUE) + "\n"
    assert read_tags(colour_images, "clear") == ", ".join(CLEAR) + "\n"
    assert sorted(result.stdout.split()) == sorted(str(colour_images / f"{n}.txt") for n in ("red", "blue", "clear"))
    assert "CPUExecutionProvider" in result.stderr
    assert "16x16" in result.stderr  # the input size read from the graph


def test_tag_text_options_from_the_command_line(cli, colour_images, wd14_tagger):
    run_tag(
        cli,
        colour_images,
        wd14_tagger,
        "--use-rating-tags",
        "--remove-underscore",
        "--character-tags-first",
        "--undesired-tags",
        "long hair,character_a",
        "--always-first-tags",
        " blue_sky , ^_^ ",
        "--tag-separator",
        " | ",
        "--general-threshold",
        "0.2",
        "--batch-size",
        "2",
    )
    assert read_tags(colour_images, "red") == "blue sky | ^_^ | sensitive | character b | white background\n"
    assert read_tags(colour_images, "blue") == "blue sky | general\n"


def test_tag_nchw_graph_with_fixed_batch_and_its_own_input_size(cli, colour_images, wd14_tagger_nchw_fixed):
    result = run_tag(cli, colour_images, wd14_tagger_nchw_fixed, "--batch-size", "3")
    assert "32x32" in result.stderr
    assert read_tags(colour_images, "red") == ", ".join(RED) + "\n"
    assert read_tags(colour_images, "clear") == ", ".join(CLEAR) + "\n"


def test_tag_deepdanbooru_folder(cli, colour_images, deepdanbooru_tagger):
    result = run_tag(cli, colour_images, deepdanbooru_tagger, "--use-rating-tags")
    assert "deepdanbooru" in result.stderr
    # Edge padding keeps green out (seen_white stays off); red is RGB channel 0 in 0–1 units.
    assert read_tags(colour_images, "red") == "rating:safe, red_hair, character_x\n"


def test_tag_with_parallel_workers_matches(cli, colour_images, wd14_tagger):
    result = cli("tag", colour_images, "--model", wd14_tagger, "--workers", "2", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.stderr
    records = {Path(r["path"]).stem: r["tags"] for r in map(json.loads, result.stdout.splitlines())}
    assert records == {"red": ", ".join(RED), "blue": ", ".join(BLUE), "clear": ", ".join(CLEAR)}


def test_existing_tags_are_kept_unless_overwrite_or_append(cli, colour_images, wd14_tagger):
    (colour_images / "red.txt").write_text("1girl, long hair\n", encoding="utf-8")
    result = run_tag(cli, colour_images, wd14_tagger)
    assert read_tags(colour_images, "red") == "1girl, long hair\n"
    assert "kept the tags of 1 image " in result.stderr
    assert str(colour_images / "red.txt") not in result.stdout

    run_tag(cli, colour_images, wd14_tagger, "--append")
    assert read_tags(colour_images, "red") == "1girl, long hair, ^_^, blue_sky, character_b, character_a\n"
    assert read_tags(colour_images, "blue") == "blue_sky\n"

    run_tag(cli, colour_images, wd14_tagger, "--overwrite")
    assert read_tags(colour_images, "red") == ", ".join(RED) + "\n"


def test_bad_images_are_skipped_and_named(cli, colour_images, wd14_tagger):
    (colour_images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = cli("tag", colour_images, "--model", wd14_tagger, "--workers", "2")
    assert result.exit_code == 0
    assert f"skipped {colour_images / 'broken.png'}:" in result.stderr
    assert not (colour_images / "broken.txt").exists()
    assert read_tags(colour_images, "red") == ", ".join(RED) + "\n"

    strict = cli("tag", colour_images, "--model", wd14_tagger, "--workers", "0", "--strict")
    assert strict.exit_code == 1
    assert "broken.png" in strict.stderr


def test_sidecar_collisions_are_skipped_not_overwritten(cli, colour_images, wd14_tagger):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(colour_images / "red.jpg")
    result = run_tag(cli, colour_images, wd14_tagger)
    assert f"skipped {colour_images / 'red.png'}: its sidecar red.txt also belongs to red.jpg" in result.stderr


def test_output_path_json_merges_into_existing_metadata(cli, colour_images, wd14_tagger, tmp_path):
    meta = tmp_path / "meta.json"
    red = os.path.abspath(colour_images / "red.png")
    meta.write_text(json.dumps({red: {"caption": "a red thing", "train_resolution": [64, 32]}, "/other.png": {}}))
    result = run_tag(cli, colour_images, wd14_tagger, "--output-path", meta)
    data = json.loads(meta.read_text(encoding="utf-8"))
    assert data[red] == {
        "caption": "a red thing",
        "train_resolution": [64, 32],
        "tags": ", ".join(RED),
        "image_size": [64, 32],
    }
    assert data["/other.png"] == {}
    assert data[os.path.abspath(colour_images / "blue.png")] == {"tags": "blue_sky", "image_size": [48, 48]}
    assert not list(colour_images.glob("*.txt"))
    assert result.stdout.strip() == str(meta)

    # Resuming keeps what is there; --append adds to the stored tags.
    data[red]["tags"] = "1girl"
    meta.write_text(json.dumps(data), encoding="utf-8")
    result = run_tag(cli, colour_images, wd14_tagger, "--output-path", meta)
    assert "kept the tags of 3 images" in result.stderr
    assert json.loads(meta.read_text())[red]["tags"] == "1girl"
    run_tag(cli, colour_images, wd14_tagger, "--output-path", meta, "--append")
    assert json.loads(meta.read_text())[red]["tags"] == "1girl, " + ", ".join(RED)


def test_output_path_jsonl(cli, colour_images, wd14_tagger, tmp_path):
    meta = tmp_path / "meta.jsonl"
    blue = os.path.abspath(colour_images / "blue.png")
    meta.write_text(json.dumps({"image_path": blue, "caption": "blue"}) + "\n", encoding="utf-8")
    run_tag(cli, colour_images, wd14_tagger, "--output-path", meta)
    lines = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()]
    by_path = {line["image_path"]: line for line in lines}
    assert by_path[blue] == {"image_path": blue, "caption": "blue", "tags": "blue_sky", "image_size": [48, 48]}
    assert by_path[os.path.abspath(colour_images / "red.png")]["tags"] == ", ".join(RED)
    assert len(lines) == 3


def test_frequency_report_on_stderr(cli, colour_images, wd14_tagger):
    result = run_tag(cli, colour_images, wd14_tagger, "--frequency")
    assert "tag frequency" in result.stderr
    assert "blue_sky" in result.stderr and "blue_sky" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--overwrite", "--append"), "exclude each other"),
        (("--output-path", "meta.txt"), "expected a .json or .jsonl file"),
        (("--tags-extension", "txt"), "leading dot"),
        (("--device", "cuda"), "onnxruntime-gpu"),
    ],
)
def test_usage_errors(cli, colour_images, wd14_tagger, args, message):
    result = cli("tag", colour_images, "--model", wd14_tagger, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_missing_model_folder_is_a_clear_error(cli, colour_images, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("tag", colour_images, "--model", tmp_path / "empty")
    assert result.exit_code == 1
    assert "no model.onnx" in result.stderr


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The layout huggingface_hub's cache uses, so `hf_hub_download` resolves offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "selected_tags.csv"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_repo_ids_resolve_through_the_hugging_face_cache(sdtool_proc, colour_images, wd14_tagger, tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "SmilingWolf/wd-tiny-tagger-v3", wd14_tagger)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = sdtool_proc("tag", colour_images, "-m", "SmilingWolf/wd-tiny-tagger-v3", "-j", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert read_tags(colour_images, "red") == ", ".join(RED) + "\n"

    missing = sdtool_proc("tag", colour_images, "-m", "SmilingWolf/not-cached", "--overwrite", env=env)
    assert missing.returncode == 1
    assert "the tagger SmilingWolf/not-cached is not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr
