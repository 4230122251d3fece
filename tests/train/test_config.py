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
    cfg = load_config(write_config(tmp_path / "old.toml", old))  # kohya's "W,H" string, as its configs need
    assert cfg.datasets[0].resolution == (64, 96)
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
        ("vae_batch_size=0", "vae_batch_size: "),
        ("vae_batch_size=4", "vae_batch_size: only used by cache_latents"),
        ("skip_cache_check=true", "skip_cache_check: kohya option not supported by sdtool (sdtool checks every"),
        ("color_aug=true", "color_aug: kohya option not supported"),
        ("general.resolution='512x512'", 'general.resolution: expected a size or "width,height"'),
        ("resolution='64,64,64'", 'resolution: expected a size or "width,height"'),
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


# --- kohya configs run unchanged (issue 18) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "general", "level", "expected"),
    [
        ('"64,96"', None, None, (64, 96)),  # kohya's --config_file form (train_util.prepare_dataset_args splits it)
        ('"64"', None, None, (64, 64)),
        ("64", None, None, (64, 64)),
        (None, '"96, 64"', None, (96, 64)),  # kohya accepts spaces: int(" 64")
        (None, "[96, 64]", None, (96, 64)),  # kohya's dataset-config forms: an int or [W, H]
        (None, None, '"128,64"', (128, 64)),
        (None, "64", "[64, 128]", (64, 128)),  # the dataset wins over [general]
    ],
)
def test_resolution_in_every_kohya_form_at_every_level(tmp_path, tiny_v1, dataset, top, general, level, expected):
    images, meta = dataset
    text = f'pretrained_model_name_or_path = "{tiny_v1}"\noutput_dir = "out"\n'
    if top is not None:
        text += f"resolution = {top}\n"
    if general is not None:
        text += f"[general]\nresolution = {general}\n"
    text += "[[datasets]]\n" + (f"resolution = {level}\n" if level is not None else "")
    text += f'  [[datasets.subsets]]\n  metadata_file = "{meta}"\n  image_dir = "{images}"\n'
    cfg = load_config(write_config(tmp_path / "c.toml", text))
    assert cfg.datasets[0].resolution == expected


# kohya's parser definitions of the keys sdtool refuses (sd-scripts 48d368fa; fine_tune.py setup_parser and the
# add_*_arguments it calls), written out here as the oracle for sdtool's table of no-op values.
KOHYA_PARSER = {
    "weighted_captions": ("store_true", False),
    "token_warmup_min": ("int", 1),
    "token_warmup_step": ("float", 0),
    "enable_wildcard": ("store_true", False),
    "color_aug": ("store_true", False),
    "random_crop": ("store_true", False),
    "face_crop_aug_range": ("str", None),
    "alpha_mask": ("store_true", False),
    "dataset_class": ("str", None),
    "debug_dataset": ("store_true", False),
    "skip_cache_check": ("store_true", False),
    "caption_extention": ("str", None),
    "torch_compile": ("store_true", False),
    "dynamo_backend": ("str", "inductor"),
    "ddp_timeout": ("int", None),
    "ddp_gradient_as_bucket_view": ("store_true", False),
    "ddp_static_graph": ("store_true", False),
    "lowram": ("store_true", False),
    "highvram": ("store_true", False),
    "fp8_base": ("store_true", False),
    "huggingface_repo_id": ("str", None),
    "huggingface_repo_type": ("str", None),
    "huggingface_path_in_repo": ("str", None),
    "huggingface_token": ("str", None),
    "huggingface_repo_visibility": ("str", None),
    "save_state_to_huggingface": ("store_true", False),
    "resume_from_huggingface": ("store_true", False),
    "async_upload": ("store_true", False),
    "wandb_api_key": ("str", None),
    "config_file": ("str", None),
    "output_config": ("store_true", False),
    "tokenizer_cache_dir": ("str", None),
    "metadata_thumbnail": ("str", None),
    "metadata_merged_from": ("str", None),
    "metadata_preprocessor": ("str", None),
    "metadata_is_negative_embedding": ("str", None),
    "console_log_level": ("str", None),
    "console_log_file": ("str", None),
    "console_log_simple": ("store_true", False),
    "lr_scheduler_type": ("str", ""),
    "lr_scheduler_args": ("str*", None),
    "lr_decay_steps": ("int_or_float", 0),
    "lr_scheduler_timescale": ("int", None),
    "lr_scheduler_min_lr_ratio": ("float", None),
    "deepspeed": ("store_true", False),
    "zero_stage": ("int", 2),
    "offload_optimizer_device": ("str", None),
    "offload_optimizer_nvme_path": ("str", None),
    "offload_param_device": ("str", None),
    "offload_param_nvme_path": ("str", None),
    "zero3_init_flag": ("store_true", False),
    "zero3_save_16bit_model": ("store_true", False),
    "fp16_master_weights_and_gradients": ("store_true", False),
    "v_pred_like_loss": ("float", None),
    "diffusers_xformers": ("store_true", False),
}


def test_no_op_table_starts_from_kohyas_parser_defaults():
    from sdtool.train.config.kohya_keys import KOHYA_DEFAULTS, UNSUPPORTED_KEYS

    # fused_backward_pass is in kohya's parser too; sdtool implements it (SDXL), so it is no longer refused.
    for key, (kind, default) in KOHYA_PARSER.items():
        assert key in UNSUPPORTED_KEYS and key in KOHYA_DEFAULTS, key
        values = KOHYA_DEFAULTS[key]
        if default is None:  # TOML cannot write None: the blank of the option's type stands for it
            blank = {"str": "", "str*": [], "int": 0, "float": 0}[kind]
            assert not values or values[0] == blank, key
        else:
            assert values[0] == default and type(values[0]) is type(default), key


def gui_config(tmp_path, tiny_v1, dataset, extra: str = "") -> Path:
    """A kohya config with every refused key spelt out at its default, as GUIs write them."""
    from sdtool.train.config.kohya_keys import KOHYA_DEFAULTS

    spelt = {k: v[0] for k, v in KOHYA_DEFAULTS.items() if v}
    spelt["dynamo_backend"] = "no"  # kohya_ss's GUI writes accelerate's "no"
    lines = [f"{key} = {json_toml(value)}" for key, value in spelt.items() if key not in ("custom_attributes",)]
    return kohya_config(tmp_path, tiny_v1, dataset, extra="\n".join(lines) + "\n" + extra)


def json_toml(value):
    import json

    return "true" if value is True else "false" if value is False else json.dumps(value)


def test_kohya_keys_at_their_default_are_accepted_and_named_at_v(cli, tmp_path, tiny_v1, dataset):
    path = gui_config(tmp_path, tiny_v1, dataset)
    load_config(path)  # no problem at all
    result = cli("-v", "train", path, "--print-config")
    assert result.exit_code == 0, result.stderr
    for key in ("color_aug", "lowram", "token_warmup_min", "dynamo_backend", "lr_scheduler_args", "alpha_mask"):
        assert f"{key} = " in result.stderr and "accepted, it does nothing in kohya either" in result.stderr, key
    quiet = cli("train", path, "--print-config")
    assert "accepted" not in quiet.stderr


@pytest.mark.parametrize(
    "override",
    [
        "color_aug=true",
        "lowram=true",
        "token_warmup_min=3",
        "token_warmup_step=0.5",
        "v_pred_like_loss=0.1",
        "lr_scheduler_args=['T_max=3']",
        "lr_scheduler_type='CosineAnnealingLR'",
        "weighted_captions=true",
        "huggingface_repo_id='me/model'",
        "torch_compile=true",
        "deepspeed=true",
    ],
)
def test_kohya_keys_at_other_values_are_refused_by_name(tmp_path, tiny_v1, dataset, override):
    key = override.split("=")[0]
    problems = problems_of(gui_config(tmp_path, tiny_v1, dataset), [override])
    assert any(p.startswith(f"{key}: kohya option not supported by sdtool") for p in problems), problems


def test_dependent_keys_are_no_ops_while_their_key_is_off(tmp_path, tiny_v1, dataset):
    path = kohya_config(tmp_path, tiny_v1, dataset, extra='dynamo_backend = "eager"\nzero_stage = 3\n')
    load_config(path)  # torch_compile and deepspeed are off: these values change nothing in kohya either
    problems = problems_of(path, ["torch_compile=true"])
    assert any(p.startswith("dynamo_backend: kohya option not supported") for p in problems)


def test_cache_latents_means_what_it_means_in_kohya(tmp_path, tiny_v1, dataset):
    path = kohya_config(tmp_path, tiny_v1, dataset)
    assert load_config(path, ["cache_latents=false"]).train.cache_latents is False
    text = path.read_text().replace("cache_latents = false\n", "")
    plain = write_config(tmp_path / "plain.toml", text)
    assert load_config(plain).train.cache_latents is False  # kohya's default: the VAE encodes each step
    assert load_config(plain, ["cache_latents_to_disk=true"]).train.cache_latents is True  # implies it, as in kohya
    problems = problems_of(path, ["cache_latents_to_disk=true"])
    assert any("cache_latents_to_disk: contradicts cache_latents = false" in p for p in problems)
    assert load_config(plain, ["optimizer_type=''"]).train.optimizer_type == "AdamW"  # kohya's "" default
