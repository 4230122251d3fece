"""The training config (CONTRACT §H): kohya names, flattening, dataset forms, overrides, all errors at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sdtool.errors import ConfigError
from sdtool.train.config import load_config
from sdtool.train.config.files import parse_override
from tests.train.conftest import dataset_toml, write_config

KOHYA = """
[model_arguments]
pretrained_model_name_or_path = "{model}"

[training_arguments]
output_dir = "out"
save_model_as = "diffusers_safetensors"
max_token_length = 225
clip_skip = 2
cache_latents = false

[optimizer_arguments]
optimizer_type = "adamw8bit"
learning_rate = 1e-4
optimizer_args = ["weight_decay=0.01", "betas=(0.9, 0.99)"]

[general]
shuffle_caption = true
keep_tokens = 1
"""


def kohya_text(model, images, meta) -> str:
    return KOHYA.format(model=model) + dataset_toml(meta, images, batch_size=2, num_repeats=3)


def kohya_config(tmp_path, tiny_v1, dataset, extra: str = "") -> object:
    images, meta = dataset
    return write_config(tmp_path / "c.toml", extra + kohya_text(tiny_v1, images, meta))


def test_kohya_sections_are_flattened_and_datasets_resolved(tmp_path, tiny_v1, dataset):
    cfg = load_config(kohya_config(tmp_path, tiny_v1, dataset))
    t = cfg.train
    assert t.optimizer_type == "AdamW8bit" and t.learning_rate == 1e-4 and t.clip_skip == 2
    assert t.output_dir == str(tmp_path / "out")
    (ds,) = cfg.datasets
    assert ds.resolution == (64, 64) and ds.batch_size == 2 and ds.enable_bucket  # bucketing on by default
    (sub,) = ds.subsets
    assert sub.options["num_repeats"] == 3 and sub.options["keep_tokens"] == 1 and sub.options["shuffle_caption"]
    assert sub.options["caption_separator"] == ","


def test_print_config_round_trips(tmp_path, tiny_v1, dataset):
    cfg = load_config(kohya_config(tmp_path, tiny_v1, dataset))
    text = cfg.to_toml()
    tomllib.loads(text)
    again = load_config(write_config(tmp_path / "again.toml", text))
    assert again.train == cfg.train
    assert again.datasets == cfg.datasets


def test_set_overrides_parse_toml_literals(tmp_path, tiny_v1, dataset):
    cfg = load_config(
        kohya_config(tmp_path, tiny_v1, dataset),
        ["learning_rate=3e-5", "output_name=my model", "general.flip_aug=true", "max_train_steps=7"],
    )
    assert cfg.train.learning_rate == 3e-5 and cfg.train.output_name == "my model"
    assert cfg.train.max_train_steps == 7
    assert cfg.datasets[0].subsets[0].options["flip_aug"] is True
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello world") == ("a", "hello world")


def test_subset_beats_dataset_beats_general_beats_top_level(tmp_path, tiny_v1, dataset):
    images, meta = dataset
    text = f"""
pretrained_model_name_or_path = "{tiny_v1}"
output_dir = "out"
save_model_as = "diffusers"
keep_tokens = 4
caption_separator = ";"
flip_aug = true
train_batch_size = 5
[general]
keep_tokens = 3
caption_separator = "|"
[[datasets]]
keep_tokens = 2
  [[datasets.subsets]]
  metadata_file = "{meta}"
  image_dir = "{images}"
  keep_tokens = 1
  [[datasets.subsets]]
  metadata_file = "{meta.with_name("meta2.json")}"
  image_dir = "{images}"
"""
    meta.with_name("meta2.json").write_text(meta.read_text())
    cfg = load_config(write_config(tmp_path / "c.toml", text))
    a, b = (s.options for s in cfg.datasets[0].subsets)
    assert (a["keep_tokens"], b["keep_tokens"]) == (1, 2)
    assert a["caption_separator"] == "|" and a["flip_aug"] is True
    assert cfg.datasets[0].batch_size == 5


def test_old_form_and_dataset_config_file(tmp_path, tiny_v1, dataset):
    images, meta = dataset
    old = f"""
pretrained_model_name_or_path = "{tiny_v1}"
output_dir = "out"
save_model_as = "diffusers"
in_json = "{meta}"
train_data_dir = "{images}"
resolution = "64,96"
dataset_repeats = 2
"""
    with pytest.raises(ConfigError, match="resolution"):
        load_config(write_config(tmp_path / "old.toml", old))  # kohya's "W,H" string is a CLI form, not TOML
    cfg = load_config(write_config(tmp_path / "old.toml", old.replace('"64,96"', "[64, 96]")))
    assert cfg.datasets[0].resolution == (64, 96)
    assert cfg.datasets[0].subsets[0].options["num_repeats"] == 2
    assert cfg.datasets[0].subsets[0].image_dir == images

    write_config(
        tmp_path / "ds.toml",
        f'[general]\nbatch_size = 3\n[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "{meta}"\n'
        f'image_dir = "{images}"\n',
    )
    top = f'pretrained_model_name_or_path = "{tiny_v1}"\noutput_dir = "o"\nsave_model_as = "diffusers"\n'
    cfg = load_config(write_config(tmp_path / "c.toml", top + 'dataset_config = "ds.toml"\n'))
    assert cfg.datasets[0].batch_size == 3


def problems_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


def test_every_problem_is_reported_at_once(tmp_path, tiny_v1, dataset):
    path = kohya_config(tmp_path, tiny_v1, dataset, extra="learning_rat = 1e-4\ncolor_aug = true\n")
    problems = problems_of(path, ["max_train_steps=many", "mixed_precision=fp8", "clip_skip=0"])
    text = "\n".join(problems)
    assert "learning_rat: unknown key; did you mean 'learning_rate'?" in text
    assert "color_aug: kohya option not supported" in text
    assert "max_train_steps: " in text and "'many'" in text
    assert "mixed_precision: expected 'no', 'fp16' or 'bf16'" in text
    assert "clip_skip: " in text
    assert len(problems) == 5


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("resume=state", "resume: "),
        ("wandb_api_key=abc", "wandb_api_key: kohya option not supported by sdtool (a key in a config file"),
        ("vae_batch_size=4", "vae_batch_size: kohya option not supported by sdtool (latents are encoded by sdtool"),
        ("save_last_n_steps=3", "save_last_n_steps: needs save_every_n_steps"),
        ("offload_ema=true", "offload_ema: needs use_ema = true"),
        ("ema_decay=1.0", "ema_decay: "),
        ("sample_every_n_steps=2", "need sample_prompts"),
        ("sample_prompts=nowhere.txt", "sample_prompts: "),
        ("log_with=tensorboard", "log_with: tensorboard needs logging_dir"),
        ("log_with=wandb", "log_with: wandb needs the package 'wandb', which is not installed"),
        ("log_prefix=x", "log_prefix: needs logging_dir or log_with"),
        ("full_bf16=true", "full_bf16: needs mixed_precision = 'bf16'"),
        ("optimizer_type=AdamW9bit", "did you mean 'AdamW8bit'"),
        ("optimizer_args=['lr']", "optimizer_args: 'lr' is not key=value"),
        ("lr_scheduler=cosin", "did you mean 'cosine'"),
        ("lr_warmup_steps=1.5", "lr_warmup_steps: a float is a ratio"),
        ("learning_rate_te=1e-5", "learning_rate_te: set, but train_text_encoder is off"),
        ("min_timestep=1000", "need min < max"),
        ("pretrained_model_name_or_path=./nowhere", "pretrained_model_name_or_path: "),
        ("vae=./novae", "vae: "),
        ("save_model_as=pickle", "save_model_as: expected"),
        ("general.shuffle_captions=true", "general.shuffle_captions: unknown key; did you mean 'shuffle_caption'?"),
        ("general.metadata_file=x.json", "general.metadata_file: unknown key here (it belongs in a subset)"),
        ("general.resolution=2.5", "general.resolution: "),
        ("xformers=true", "xformers: "),
    ],
)
def test_bad_values_name_their_key(tmp_path, tiny_v1, dataset, override, needle):
    problems = problems_of(kohya_config(tmp_path, tiny_v1, dataset), [override])
    assert any(needle in p for p in problems), problems


def test_two_attention_implementations_are_refused(tmp_path, tiny_v1, dataset):
    problems = problems_of(kohya_config(tmp_path, tiny_v1, dataset), ["sdpa=true", "mem_eff_attn=true"])
    assert "sdpa/mem_eff_attn: choose one attention implementation" in problems


def test_missing_dataset_paths(tmp_path, tiny_v1, dataset):
    _images, _meta = dataset
    text = kohya_text(tiny_v1, tmp_path / "noimages", tmp_path / "nometa.json")
    problems = problems_of(write_config(tmp_path / "c.toml", text))
    assert any(p.startswith("datasets[0].subsets[0].metadata_file:") for p in problems)
    assert any(p.startswith("datasets[0].subsets[0].image_dir:") for p in problems)


def test_existing_outputs_are_not_a_config_problem(cli, tmp_path, tiny_v1, dataset):
    # What a rerun does with them is train/rerun.py's business (tests/train/test_rerun.py); the config, its printout
    # and the dry run are the same whatever the output folder holds.
    path = kohya_config(tmp_path, tiny_v1, dataset)
    (tmp_path / "out" / "last").mkdir(parents=True)
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    load_config(path)
    printed = cli("train", path, "--print-config")
    assert printed.exit_code == 0 and "already exists" not in printed.stderr
    dry = cli("train", path, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "this run is finished" in dry.stderr and "dry run: nothing trained" in dry.stderr


def test_cli_exit_2_lists_each_problem(cli, tmp_path, tiny_v1, dataset):
    path = kohya_config(tmp_path, tiny_v1, dataset, extra="learning_rat = 1\nlowram = true\n")
    result = cli("train", path, "--set", "clip_skip=two")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 3
    assert "learning_rat" in result.stderr and "lowram" in result.stderr and "clip_skip" in result.stderr
    assert result.stdout == ""


def test_misspelled_dataset_tables_get_a_did_you_mean(tmp_path, tiny_v1, dataset):
    images, meta = dataset
    text = (
        kohya_text(tiny_v1, images, meta)
        .replace("[[datasets]]", "[[dataset]]")
        .replace("datasets.subsets", "dataset.subsets")
    )
    problems = problems_of(write_config(tmp_path / "c.toml", text + "\n[genral]\nshuffle_caption = true\n"))
    assert "[[dataset]]: unknown table; did you mean [[datasets]]?" in problems
    assert "[genral]: unknown table; did you mean [general]?" in problems


def test_cli_print_config(cli, tmp_path, tiny_v1, dataset):
    result = cli("train", kohya_config(tmp_path, tiny_v1, dataset), "--print-config")
    assert result.exit_code == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["clip_skip"] == 2 and data["datasets"][0]["subsets"][0]["num_repeats"] == 3
    assert not (tmp_path / "out").exists()


def test_cli_launch_flags_are_not_silently_ignored(cli, tmp_path, tiny_v1, dataset):
    # The launch itself is tested in test_distributed.py; a launch that cannot work stops before any process starts.
    missing = tmp_path / "missing.yaml"
    result = cli(
        "train", kohya_config(tmp_path, tiny_v1, dataset), "--num-processes", "2", "--accelerate-config", missing
    )
    assert result.exit_code == 2 and f"--accelerate-config {missing}: no such file" in result.stderr


def test_readme_example_config_uses_only_known_keys():
    """The commented example in README `### train` stays in step with the schema (set and commented-out keys)."""
    import re

    from sdtool.train.config.schema import GENERAL_KEYS, SUBSET_KEYS, TOP_KEYS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### train", 1)[1].split("\n### ", 1)[0]
    block = section.split("```toml", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    keys = {k for table, v in data.items() if table not in ("general", "datasets") for k in v}
    keys |= set(data["general"]) | {k for d in data["datasets"] for k in d if k != "subsets"}
    keys |= {k for d in data["datasets"] for s in d["subsets"] for k in s}
    keys |= set(re.findall(r"^\s*# ?(\w+) = ", block, flags=re.MULTILINE))
    assert "save_every_n_steps" in keys and "use_ema" in keys
    assert keys - (TOP_KEYS | GENERAL_KEYS | SUBSET_KEYS) == set()
