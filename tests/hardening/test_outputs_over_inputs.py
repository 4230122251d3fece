"""Outputs never replace inputs (docs/promises.md): whatever the flags, `--overwrite` included, a command
refuses (exit 2, one line) to write over one of its inputs or over a folder that is not an sdtool model, and the
inputs stay byte for byte as they were.

Before: `convert SRC DIR --overwrite` deleted DIR's other files (SRC among them), `bucket -o img.png --overwrite`
replaced an image with JSON, `caption --caption-extension .jpg` wrote captions over images, and training with
`output_dir` = an `image_dir` wrote its samples among the training images.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.hardening.corpus import snapshot
from tests.imagegen import save_rgb
from tests.train.conftest import dataset_toml, make_dataset, write_config


def one_error(result) -> str:
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unexpected" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_v1) -> Path:
    """The tiny model as one .safetensors file."""
    from typer.testing import CliRunner

    from sdtool.cli import app

    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    assert CliRunner().invoke(app, ["convert", str(tiny_v1), str(path)]).exit_code == 0
    return path


@pytest.mark.slow
def test_convert_overwrite_never_replaces_a_folder_that_is_not_a_model(cli, tmp_path, tiny_file, tiny_v1):
    folder = tmp_path / "downloads"
    folder.mkdir()
    src = folder / "model.safetensors"
    shutil.copy(tiny_file, src)
    (folder / "notes.txt").write_text("mine\n")
    before = snapshot(folder)

    inside = one_error(cli("convert", src, folder, "--overwrite"))  # SRC inside DST
    assert str(src) in inside and "holds the input" in inside
    other = tmp_path / "photos"
    other.mkdir()
    save_rgb(other / "holiday.png", 8, 8)
    other_before = snapshot(other)
    refused = one_error(cli("convert", src, other, "--overwrite"))  # a folder of other files
    assert "is never replaced" in refused and "model_index.json" in refused
    assert snapshot(folder) == before and snapshot(other) == other_before

    model = tmp_path / "model"  # a model folder sdtool wrote is replaced, with --overwrite only
    config = ["--config", tiny_v1]  # the tiny model's own configs (the built-in ones are SD-sized)
    assert cli("convert", src, model, *config).exit_code == 0
    assert cli("convert", src, model, *config).exit_code == 1
    assert cli("convert", src, model, *config, "--overwrite").exit_code == 0
    assert (model / "model_index.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("convert", src, empty, *config, "--overwrite").exit_code == 0  # an empty folder holds nothing


def test_bucket_output_can_never_be_an_input(cli, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    save_rgb(images / "img.png", 16, 16)
    (images / "img.txt").write_text("tags\n")
    before = snapshot(images)
    assert "named like an image" in one_error(cli("bucket", images, "-o", images / "img.png", "--overwrite"))
    assert "is one of the inputs" in one_error(cli("bucket", images, "-o", images / "img.txt", "--overwrite"))
    link = tmp_path / "meta.json"
    link.symlink_to(images / "img.txt")  # the same file under another name
    assert "is one of the inputs" in one_error(cli("bucket", images, "-o", link, "--overwrite"))
    assert snapshot(images) == before


@pytest.mark.parametrize(("command", "option"), [("caption", "--caption-extension"), ("tag", "--tags-extension")])
def test_a_sidecar_extension_is_never_an_image_extension(cli, tmp_path, command, option):
    images = tmp_path / "images"
    images.mkdir()
    save_rgb(images / "a.png", 16, 16)
    save_rgb(images / "b.jpg", 16, 16)
    before = snapshot(images)
    for ext in (".jpg", ".PNG", ".webp"):
        error = one_error(cli(command, images, option, ext, "--overwrite", "-m", tmp_path / "none"))
        assert option in error and "named like an image" in error
    assert snapshot(images) == before


def test_training_output_dir_is_never_an_image_dir(cli, tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "data", 2)
    text = f'pretrained_model_name_or_path = "{tiny_v1}"\noutput_dir = "{images}"\nmax_train_steps = 1\n'
    cfg = write_config(tmp_path / "train.toml", text + dataset_toml(meta, images))
    error = one_error(cli("train", cfg))
    assert error.startswith(f"error: output_dir: {images} is the image_dir of datasets[0].subsets[0]"), error


def test_training_never_replaces_a_folder_of_other_files_under_its_diffusers_output_name(cli, tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "data", 2)
    mine = tmp_path / "out" / "m"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    text = (
        f'pretrained_model_name_or_path = "{tiny_v1}"\noutput_dir = "{tmp_path / "out"}"\noutput_name = "m"\n'
        'save_model_as = "diffusers"\noverwrite = true\nmax_train_steps = 1\n'
    )
    cfg = write_config(tmp_path / "train.toml", text + dataset_toml(meta, images))
    error = one_error(cli("train", cfg))
    assert error.startswith(f"error: output_name: {mine} is a folder of other files"), error
    assert (mine / "notes.txt").read_text() == "mine\n"
