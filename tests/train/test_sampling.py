"""Sample images during training: kohya prompt files, the schedule, rendering, and leaving training untouched."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sdtool.errors import InputError, UsageError
from sdtool.train.sample_prompts import SAMPLERS, SamplePrompt, parse_prompt_line, read_sample_prompts
from sdtool.train.sampling import build_scheduler, generate_samples, should_sample

# ---------------------------------------------------------------------------------------------------------------------
# Prompt files


def test_txt_prompts_parse_with_comments_blank_lines_and_all_options(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# kohya sample prompts\n"
        "\n"
        "masterpiece, 1girl, looking at viewer --n low quality, worst quality --w 768 --h 512 --d 1 --l 7.5 --s 28\n"
        "   # an indented comment\n"
        "a cat --ss euler_a --D 42 --L 4\n"
        "a dog\n",
        encoding="utf-8",
    )
    prompts = read_sample_prompts(f)
    assert [p.prompt for p in prompts] == ["masterpiece, 1girl, looking at viewer", "a cat", "a dog"]
    first = prompts[0]
    assert (first.negative_prompt, first.width, first.height, first.seed, first.scale, first.steps) == (
        "low quality, worst quality",
        768,
        512,
        1,
        7.5,
        28,
    )
    assert first.sampler is None and first.source == f"{f}:3"
    assert (prompts[1].sampler, prompts[1].seed, prompts[1].scale) == ("euler_a", 42, 4.0)
    assert prompts[2] == SamplePrompt("a dog", source=f"{f}:6")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --x 3", "unknown option --x"),
        ("a cat --g 3.5", "--g (guidance scale"),
        ("a cat --cn control.png", "--cn (a ControlNet image)"),
        ("a cat --w wide", "'wide' is not a whole number"),
        ("a cat --l 7,5", "'7,5' is not a number"),
        ("a cat --w 512 --w 768", "--w is given twice"),
        ("a cat --ss euler_x", "unknown sampler 'euler_x'"),
        ("a cat --s 0", "steps must be between 1 and 1000"),
        ("a cat --n", "--n needs a value"),
    ],
)
def test_bad_txt_option_is_an_error_naming_the_line(tmp_path, line, message):
    f = tmp_path / "prompts.txt"
    f.write_text(f"# ok\na dog --w 512\n{line}\n", encoding="utf-8")
    with pytest.raises(UsageError) as exc:
        read_sample_prompts(f)
    assert f"{f}:3" in exc.value.message
    assert message in exc.value.message


def test_toml_prompts_in_kohya_layout_merge_defaults(tmp_path):
    f = tmp_path / "prompts.toml"
    f.write_text(
        """
[prompt]
negative_prompt = "lowres"
width = 512
height = 768
sample_steps = 20
scale = 7

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
width = 640
sample_sampler = "k_euler"
""",
        encoding="utf-8",
    )
    cat, dog = read_sample_prompts(f)
    assert (cat.prompt, cat.negative_prompt, cat.width, cat.height, cat.steps, cat.scale, cat.seed) == (
        "a cat",
        "lowres",
        512,
        768,
        20,
        7.0,
        1,
    )
    assert (dog.prompt, dog.width, dog.height, dog.sampler, dog.seed) == ("a dog", 640, 768, "k_euler", None)


def test_toml_prompt_array_and_bad_keys(tmp_path):
    f = tmp_path / "prompts.toml"
    f.write_text('[[prompt]]\nprompt = "a cat"\nseed = 3\n\n[[prompt]]\nprompt = "a dog"\n', encoding="utf-8")
    assert [(p.prompt, p.seed) for p in read_sample_prompts(f)] == [("a cat", 3), ("a dog", None)]

    f.write_text('[[prompt]]\nprompt = "a cat"\n\n[[prompt]]\nprompt = "a dog"\nstep = 3\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"\[\[prompt\]\] #2: unknown key\(s\) step"):
        read_sample_prompts(f)
    f.write_text('[[prompt]]\nprompt = "a cat"\nwidth = "512"\n', encoding="utf-8")
    with pytest.raises(UsageError, match="width has the wrong type"):
        read_sample_prompts(f)
    f.write_text("[prompt]\nwidth = 512\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"prompt\.subset"):
        read_sample_prompts(f)


def test_json_prompts_objects_and_lines(tmp_path):
    f = tmp_path / "prompts.json"
    data = [{"prompt": "a cat", "negative_prompt": "blurry", "scale": 5.5, "sample_steps": 12}, "a dog --d 9 --w 320"]
    f.write_text(json.dumps(data), encoding="utf-8")
    cat, dog = read_sample_prompts(f)
    assert (cat.prompt, cat.negative_prompt, cat.scale, cat.steps) == ("a cat", "blurry", 5.5, 12)
    assert (dog.prompt, dog.seed, dog.width) == ("a dog", 9, 320)

    f.write_text(json.dumps([{"prompt": "a cat"}, {"prompt": "a dog", "sampler": "ddim"}]), encoding="utf-8")
    with pytest.raises(UsageError, match="item 1: unknown key"):
        read_sample_prompts(f)
    f.write_text(json.dumps(["a cat", "a dog --q 1"]), encoding="utf-8")
    with pytest.raises(UsageError, match="item 1: unknown option --q"):
        read_sample_prompts(f)


def test_unusable_prompt_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_sample_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.yaml").write_text("a cat\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"\.txt, \.toml or \.json"):
        read_sample_prompts(tmp_path / "p.yaml")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no sample prompts"):
        read_sample_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="invalid JSON"):
        read_sample_prompts(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------------------------
# Schedule and samplers


def test_should_sample_follows_kohya_rules():
    steps_only = dict(every_n_steps=10, every_n_epochs=None, at_first=False)
    assert not should_sample(0, 0, **steps_only, epoch_end=False)
    assert should_sample(0, 0, **{**steps_only, "at_first": True}, epoch_end=False)
    assert [s for s in range(1, 31) if should_sample(s, 0, **steps_only, epoch_end=False)] == [10, 20, 30]
    assert not should_sample(20, 1, **steps_only, epoch_end=True)  # step sampling never fires at epoch ends

    epochs = dict(every_n_steps=10, every_n_epochs=2, at_first=False)  # epochs replace the step schedule
    assert not should_sample(10, 0, **epochs, epoch_end=False)
    assert [e for e in range(1, 7) if should_sample(100 * e, e, **epochs, epoch_end=True)] == [2, 4, 6]

    none = dict(every_n_steps=None, every_n_epochs=None, at_first=False)
    assert not any(should_sample(s, 1, **none, epoch_end=end) for s in range(5) for end in (False, True))
    with pytest.raises(UsageError, match="sample_every_n_steps"):
        should_sample(5, 0, every_n_steps=0, every_n_epochs=None, at_first=False, epoch_end=False)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_from_the_model_config_and_keeps_v_prediction(name):
    import diffusers

    config = dict(diffusers.DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear").config)
    scheduler = build_scheduler(name, config)
    assert type(scheduler).__name__ == SAMPLERS[name][0]
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(3)  # usable


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(UsageError, match="unknown sampler 'ddpm'") as exc:
        build_scheduler("ddpm", {})
    assert "euler_a" in (exc.value.hint or "")
    assert parse_prompt_line("a cat --ss K_EULER_A").sampler == "k_euler_a"


def test_preserved_rng_state_restores_torch_numpy_and_random():
    import numpy as np
    import torch

    from sdtool.train.sampling import preserved_rng_state

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with preserved_rng_state():
        torch.rand(5), np.random.rand(5), random.random()
        torch.manual_seed(99)  # even a reseed inside is undone
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering with the tiny models


def _encode_short_prompts(tokenizer, text_encoder, prompts, max_token_length, clip_skip):
    """Last hidden state of 77-token CLIP input: what training's encoder gives for prompts of ≤75 tokens."""
    import torch

    assert max_token_length is None and clip_skip is None
    ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(ids.input_ids.to(text_encoder.device)).last_hidden_state


def _generate(model, prompts, out_dir, **kwargs):
    import torch

    options = dict(step=7, epoch=1, device="cpu", dtype=torch.float32, default_steps=1, default_size=(64, 64))
    options.update(kwargs)
    return generate_samples(
        model.unet,
        model.vae,
        model.text_encoder,
        model.tokenizer,
        model.scheduler_config,
        prompts,
        encode_prompts=_encode_short_prompts,
        out_dir=out_dir,
        **options,
    )


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def model_v1(tiny_v1):
    from sdtool.models.loading import load_model

    return load_model(tiny_v1)


@pytest.fixture(scope="module")
def model_v2(tiny_v2):
    from sdtool.models.loading import load_model

    return load_model(tiny_v2)


@pytest.mark.slow
def test_samples_and_grid_are_written_without_touching_training_state(model_v1, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    m = model_v1
    m.unet.train()
    m.unet.conv_out.eval()  # a submodule in its own mode must get it back, not the parent's
    m.text_encoder.eval()
    m.vae.train()
    modes = {name: mod.training for model in (m.unet, m.vae, m.text_encoder) for name, mod in model.named_modules()}
    weights = {id(model): {k: v.clone() for k, v in model.state_dict().items()} for model in (m.unet, m.vae)}

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    prompts = [SamplePrompt("a cat", seed=5), SamplePrompt("a dog", width=80, height=64, steps=2, sampler="euler_a")]
    paths = _generate(m, prompts, tmp_path / "sample", name_prefix="run")

    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    after = {name: mod.training for model in (m.unet, m.vae, m.text_encoder) for name, mod in model.named_modules()}
    assert after == modes
    for model in (m.unet, m.vae):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights[id(model)].items())

    # seed 5 given; the second prompt has none and gets its index (1)
    assert [p.name for p in paths] == ["run_000007_00_5.png", "run_000007_01_1.png", "run_000007_grid.png"]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(64, 64), (80, 64), (2 * 80, 64)]
    with Image.open(paths[1]) as im:
        record = json.loads(im.text["sdtool"])
        parameters = im.text["parameters"]
    assert record["prompt"] == "a dog" and record["sampler"] == "euler_a" and record["steps"] == 2
    assert record["step"] == 7 and record["seed"] == 1
    assert "Sampler: euler_a" in parameters and "Size: 80x64" in parameters
    assert not list((tmp_path / "sample").glob(".*"))  # no temp files left


@pytest.mark.slow
def test_same_seed_same_image_and_matches_the_diffusers_pipeline(model_v1, tmp_path):
    """Oracle: diffusers' own pipeline with its own prompt encoding and the same seeded CPU generator."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    m = model_v1
    prompts = ["a photo of a cat --d 11 --l 5 --s 2", "a photo of a cat --d 12 --l 5 --s 2"]
    first = _generate(m, prompts, tmp_path / "a", epoch_end=True, epoch=3)
    again = _generate(m, prompts[:1], tmp_path / "b")
    assert first[0].name == "e000003_00_11.png"
    assert np.array_equal(_pixels(first[0]), _pixels(again[0]))
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))

    for model in (m.unet, m.vae, m.text_encoder):
        model.eval()
    pipe = StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        tokenizer=m.tokenizer,
        unet=m.unet,
        scheduler=build_scheduler("ddim", m.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="pil",
    ).images[0]
    assert np.array_equal(_pixels(first[0]), np.asarray(expected))


@pytest.mark.slow
def test_v2_samples_with_v_prediction(model_v2, tmp_path):
    import numpy as np

    m = model_v2
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert build_scheduler("dpmsolver++", m.scheduler_config).config.prediction_type == "v_prediction"
    v_pred = _generate(m, ["a cat --d 4 --ss dpmsolver++"], tmp_path / "v")
    epsilon_config = {**m.scheduler_config, "prediction_type": "epsilon"}
    as_epsilon = generate_samples(
        m.unet,
        m.vae,
        m.text_encoder,
        m.tokenizer,
        epsilon_config,
        ["a cat --d 4 --ss dpmsolver++"],
        encode_prompts=_encode_short_prompts,
        out_dir=tmp_path / "e",
        step=7,
        epoch=1,
        device="cpu",
        dtype=None,
        default_steps=2,
        default_size=(64, 64),
    )
    # the prediction type reaches the sampler: reading the same U-Net output as epsilon gives another image
    assert not np.array_equal(_pixels(v_pred[0]), _pixels(as_epsilon[0]))


@pytest.mark.slow
def test_training_is_bit_identical_with_and_without_sampling(tiny_v1, tmp_path):
    """Two SGD steps with dropout and random noise, sampling in between or not: the same weights come out."""
    import torch

    from sdtool.models.loading import load_model

    def train(sample: bool):
        m = load_model(tiny_v1)
        m.unet.train()
        optimizer = torch.optim.SGD(m.unet.parameters(), lr=0.1)
        torch.manual_seed(0)
        embeds = _encode_short_prompts(m.tokenizer, m.text_encoder, ["a cat"], None, None)
        for step in (1, 2):
            noise = torch.randn(1, 4, 8, 8)
            t = torch.randint(0, 1000, (1,))
            loss = torch.nn.functional.dropout(m.unet(noise, t, embeds).sample, 0.5).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if sample and step == 1:
                _generate(m, ["a dog"], tmp_path / "sample", step=step)
        return m.unet.state_dict()

    with_sampling, without = train(True), train(False)
    assert all(torch.equal(with_sampling[k], without[k]) for k in without)


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_sampling_moves_models_back_and_keeps_cuda_rng(model_v1, tmp_path):
    import torch

    m = model_v1
    torch.cuda.manual_seed_all(5)
    cuda_state = torch.cuda.get_rng_state_all()
    paths = _generate(m, ["a cat --d 1"], tmp_path, device="cuda", dtype=torch.float16)
    assert len(paths) == 2
    assert all(next(model.parameters()).device.type == "cpu" for model in (m.unet, m.vae, m.text_encoder))
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_state, strict=True))


@pytest.mark.slow
def test_sdxl_samples_match_the_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path):
    """Oracle: diffusers' StableDiffusionXLPipeline with its own prompt encoding (penultimate states of both
    encoders, the projected pooled embedding, size conditioning (h, w, 0, 0, h, w)) and the same seeded generator."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdtool.models.families.sdxl import SDXL
    from sdtool.models.loading import load_model

    m = load_model(tiny_sdxl)
    paths = generate_samples(
        m.unet,
        m.vae,
        m.text_encoders,
        m.tokenizers,
        m.scheduler_config,
        ["a photo of a cat --d 11 --l 5 --s 2 --w 64 --h 96"],
        encode_prompts=SDXL.encode_prompts,
        family=SDXL,
        out_dir=tmp_path,
        step=1,
        epoch=1,
        device="cpu",
        dtype=torch.float32,
    )
    for model in (m.unet, m.vae, m.text_encoder, m.text_encoder_2):
        model.eval()
    pipe = StableDiffusionXLPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        text_encoder_2=m.text_encoder_2,
        tokenizer=m.tokenizer,
        tokenizer_2=m.tokenizer_2,
        unet=m.unet,
        scheduler=build_scheduler("ddim", m.scheduler_config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a photo of a cat",
        negative_prompt="",
        height=96,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="pil",
    ).images[0]
    assert np.array_equal(_pixels(paths[0]), np.asarray(expected))
