"""A kohya `fine_tune.py` config, in the form kohya's docs show, trains to the end with `sdtool train` unchanged.

The form is kohya's `--config_file` TOML (docs/config_README: option groups as tables, `resolution = "512,512"` as
the string `train_util.prepare_dataset_args` splits), over metadata with `in_json` + `train_data_dir` as
`fine_tune.py` reads it, with the defaults a GUI spells out and `cache_latents = true` but no cache yet: kohya's
trainer then encodes the latents itself before training, and so does sdtool.
"""

from __future__ import annotations

import json

import pytest

from tests.imagegen import save_rgb
from tests.train.conftest import CAPTIONS, write_config

pytestmark = pytest.mark.slow

KOHYA_FINE_TUNE = """
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "{model}"
tokenizer_cache_dir = ""

[dataset_arguments]
train_data_dir = "{images}"
in_json = "{meta}"
resolution = "512,512"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false
dataset_repeats = 1
shuffle_caption = false
keep_tokens = 0
caption_extension = ".caption"
color_aug = false
flip_aug = false
random_crop = false
face_crop_aug_range = ""
alpha_mask = false
token_warmup_min = 1
token_warmup_step = 0
cache_latents = true
vae_batch_size = 1
skip_cache_check = false
debug_dataset = false

[training_arguments]
output_dir = "{out}"
output_name = "kohya-ft"
save_precision = "fp16"
save_every_n_epochs = 1
train_batch_size = 1
max_token_length = 225
mem_eff_attn = false
xformers = false
sdpa = false
torch_compile = false
dynamo_backend = "no"
max_train_steps = 3
max_data_loader_n_workers = 0
persistent_data_loader_workers = false
seed = 42
gradient_checkpointing = false
gradient_accumulation_steps = 1
mixed_precision = "no"
full_fp16 = false
lowram = false
highvram = false
clip_skip = 2
noise_offset = 0.0
multires_noise_iterations = 0
multires_noise_discount = 0.3
ip_noise_gamma = 0
min_snr_gamma = 0
v_pred_like_loss = 0.0
weighted_captions = false
diffusers_xformers = false
train_text_encoder = false
no_half_vae = false
ddp_gradient_as_bucket_view = false
ddp_static_graph = false
huggingface_repo_id = ""

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
max_grad_norm = 1.0
optimizer_args = []
lr_scheduler = "constant"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1.0
lr_scheduler_type = ""
lr_scheduler_args = []
lr_decay_steps = 0
fused_backward_pass = false

[saving_arguments]
save_model_as = "safetensors"
use_safetensors = false
save_state = false
"""


def test_kohya_fine_tune_config_trains_unchanged_encoding_its_latents_first(cli, tmp_path, tiny_v1):
    images = tmp_path / "train"
    images.mkdir()
    for i, (w, h) in enumerate([(520, 520), (700, 400), (400, 640)]):
        save_rgb(images / f"img{i}.png", w, h, seed=i)
        (images / f"img{i}.caption").write_text(CAPTIONS[i])
    meta = tmp_path / "meta_lat.json"
    bucketed = cli("bucket", images, "-o", meta, "--resolution", "512", "--max-bucket-reso", "1024")
    assert bucketed.exit_code == 0, bucketed.stderr
    text = KOHYA_FINE_TUNE.format(model=tiny_v1, images=images, meta=meta, out=tmp_path / "out")
    config = write_config(tmp_path / "fine_tune.toml", text)
    before = {p.name for p in tmp_path.rglob("*")}

    result = cli("train", config)
    assert result.exit_code == 0, result.stderr
    assert "error" not in result.stderr.lower()
    saved = tmp_path / "out" / "kohya-ft.safetensors"
    assert result.stdout.strip() == str(saved) and saved.is_file()
    # cache_latents without cache_latents_to_disk: encoded before the first step, kept in memory, nothing written
    assert "3 images have no usable cached latents; encoding them into memory" in result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    written = {p.name for p in tmp_path.rglob("*")} - before
    assert not [name for name in written if name.endswith((".npz", ".latents")) or "latents" in name]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(saved), config=str(tiny_v1), safety_checker=None)
    assert pipe.unet.dtype.is_floating_point
