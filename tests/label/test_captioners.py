"""`sdtool caption` against transformers' own `generate` + decode on tiny BLIP and GIT models built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow


def oracle_captions(model_dir: Path, images: list[Path], batch_size: int, *, prompt=None, seed=None, git=False, **gen):
    """Plain transformers: processor → generate → batch_decode, batch by batch, prompt removed from the front."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    if seed is not None:
        torch.manual_seed(seed)
    captions = []
    for start in range(0, len(images), batch_size):
        pil = [Image.open(p).convert("RGB") for p in images[start : start + batch_size]]
        if prompt and git:
            # GIT's model card: [CLS] + prompt tokens, no closing [SEP].
            ids = [processor.tokenizer.cls_token_id, *processor.tokenizer(prompt, add_special_tokens=False).input_ids]
            inputs = processor(images=pil, return_tensors="pt")
            inputs["input_ids"] = torch.tensor([ids] * len(pil))
        elif prompt:
            inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
        else:
            inputs = processor(images=pil, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, **gen)
        for text in processor.batch_decode(out, skip_special_tokens=True):
            text = text.strip()
            if prompt:
                assert text.startswith(prompt.lower()), text
                text = text[len(prompt) :].strip()
            captions.append(text)
    return captions


def run_caption(cli, folder: Path, model: Path, *args: str):
    result = cli("caption", folder, "--model", model, "--device", "cpu", *args)
    assert result.exit_code == 0, result.stderr
    return result


def written(folder: Path, ext: str = ".caption") -> list[str]:
    return [p.with_suffix(ext).read_text(encoding="utf-8") for p in sorted(folder.glob("*.png"))]


def test_greedy_matches_generate_and_batching_does_not_change_it(cli, photo_images, tiny_blip):
    images = sorted(photo_images.glob("*.png"))
    gen = {"max_new_tokens": 12, "min_new_tokens": 4, "num_beams": 1, "do_sample": False}
    expected = oracle_captions(tiny_blip, images, 1, **gen)
    assert len(set(expected)) > 1  # the tiny model really looks at the image
    run_caption(cli, photo_images, tiny_blip, "--max-length", "12", "--min-length", "4", "-b", "2", "-j", "2")
    assert written(photo_images) == [c + "\n" for c in expected]


def test_beam_search_with_prompt_matches_generate(cli, photo_images, tiny_blip):
    images = sorted(photo_images.glob("*.png"))
    gen = {"max_new_tokens": 10, "min_new_tokens": 3, "num_beams": 3, "do_sample": False}
    expected = oracle_captions(tiny_blip, images, 3, prompt="a picture of", **gen)
    result = run_caption(
        cli,
        photo_images,
        tiny_blip,
        *("--num-beams", "3", "--max-length", "10", "--min-length", "3"),
        *("--prompt", "A picture of", "-b", "3", "-j", "0", "--json"),
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["caption"] for r in records] == expected
    assert [r["path"] for r in records] == [str(p) for p in images]
    assert all(not c.startswith("a picture of") for c in expected)


def test_seeded_nucleus_sampling_matches_generate(cli, photo_images, tiny_blip):
    images = sorted(photo_images.glob("*.png"))
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 1, "do_sample": True, "top_p": 0.9}
    expected = oracle_captions(tiny_blip, images, 5, seed=7, **gen)
    args = ("--top-p", "0.9", "--seed", "7", "--max-length", "8", "--min-length", "8", "-b", "5", "-j", "2")
    run_caption(cli, photo_images, tiny_blip, *args)
    assert written(photo_images) == [c + "\n" for c in expected]
    # Same seed again → same captions; another seed → different ones.
    run_caption(cli, photo_images, tiny_blip, *args, "--overwrite")
    assert written(photo_images) == [c + "\n" for c in expected]
    other = ("--top-p", "0.9", "--seed", "8", "--max-length", "8", "--min-length", "8", "-b", "5")
    run_caption(cli, photo_images, tiny_blip, *other, "--overwrite")
    assert written(photo_images) != [c + "\n" for c in expected]


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_git_matches_generate(cli, photo_images, tiny_git, prompt):
    images = sorted(photo_images.glob("*.png"))
    gen = {"max_new_tokens": 9, "min_new_tokens": 2, "num_beams": 1, "do_sample": False}
    expected = oracle_captions(tiny_git, images, 2, prompt=prompt, git=True, **gen)
    args = ["--max-length", "9", "--min-length", "2", "-b", "2", "--caption-extension", ".txt"]
    if prompt:
        args += ["--prompt", prompt]
    run_caption(cli, photo_images, tiny_git, *args)
    assert written(photo_images, ".txt") == [c + "\n" for c in expected]


def test_existing_captions_kept_bad_images_named_overwrite(cli, photo_images, tiny_blip):
    (photo_images / "img0.caption").write_text("my own caption\n", encoding="utf-8")
    (photo_images / "broken.png").write_bytes(b"not an image at all")
    result = run_caption(cli, photo_images, tiny_blip, "--max-length", "5", "-j", "2")
    assert (photo_images / "img0.caption").read_text() == "my own caption\n"
    assert "kept 1 existing .caption file " in result.stderr
    assert f"skipped {photo_images / 'broken.png'}:" in result.stderr
    assert sorted(result.stdout.split()) == [str(photo_images / f"img{i}.caption") for i in range(1, 5)]

    strict = cli("caption", photo_images, "--model", tiny_blip, "--strict", "--device", "cpu")
    assert strict.exit_code == 1  # the broken image is still there

    run_caption(cli, photo_images, tiny_blip, "--max-length", "5", "--overwrite")
    assert (photo_images / "img0.caption").read_text() != "my own caption\n"


def test_nothing_to_do_does_not_load_the_model(cli, photo_images, tmp_path):
    for p in photo_images.glob("*.png"):
        p.with_suffix(".caption").write_text("done\n")
    result = cli("caption", photo_images, "--model", tmp_path / "no-such-model")
    assert result.exit_code == 0, result.stderr
    assert "kept 5 existing" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--min-length", "9", "--max-length", "4"), "larger than --max-length"),
        (("--caption-extension", "caption"), "leading dot"),
        (("--top-p", "0"), "--top-p"),
    ],
)
def test_usage_errors(cli, photo_images, tiny_blip, args, message):
    result = cli("caption", photo_images, "--model", tiny_blip, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_not_an_image_to_text_model(cli, photo_images, tiny_v1):
    result = cli("caption", photo_images, "--model", tiny_v1 / "text_encoder")
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") or "\nerror:" in result.stderr
    assert "Traceback" not in result.stderr
