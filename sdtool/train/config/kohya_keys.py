"""kohya's `fine_tune.py` keys that sdtool knows but does not implement: each is refused by name, with the reason,
unless it is written at a value that does nothing in kohya either.

Configs written by GUIs spell every option out at its default (`color_aug = false`, `vae_batch_size = 1`,
`lr_scheduler_args = []` …), so such a value is accepted (and named at `-v`): refusing it would make a kohya config
fail for nothing, and accepting it ignores nothing. Any other value is refused by name, because sdtool would
otherwise ignore it.

`KOHYA_DEFAULTS` holds each such key's parser default, copied from kohya's argparse definitions
(`fine_tune.py setup_parser` and the `train_util` / `config_util` / `deepspeed_utils` / `custom_train_functions`
`add_*_arguments` it calls, sd-scripts 48d368fa; `reference/kohya-fine-tune.md` §1.7.1 and §2), followed by the
other spellings of "off" kohya treats the same way: `false` where the code only tests truthiness, `""` for a text
option whose default is None (TOML cannot write None, so GUIs write an empty string), `[]` for a list option.
`ONLY_WITH` names keys that act only when another key is on (`dynamo_backend` only with `torch_compile`, the ZeRO
options only with `deepspeed`): any value of theirs is a no-op while that key is off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# kohya keys sdtool knows but does not implement: rejected by name with the reason, never accepted and ignored.
_LATER = "not implemented yet in sdtool"


_NO_EFFECT = "has no effect on SD1/2 fine-tuning in kohya either"


# kohya's DeepSpeed options: each only means something with `deepspeed = true`.
_DEEPSPEED_OPTIONS = (
    "zero_stage",
    "offload_optimizer_device",
    "offload_optimizer_nvme_path",
    "offload_param_device",
    "offload_param_nvme_path",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "fp16_master_weights_and_gradients",
)

UNSUPPORTED_KEYS: dict[str, str] = {
    **dict.fromkeys(
        (
            "weighted_captions",
            "token_warmup_min",
            "token_warmup_step",
            "enable_wildcard",
            "torch_compile",
            "dynamo_backend",
            "ddp_timeout",
            "ddp_gradient_as_bucket_view",
            "ddp_static_graph",
            "lr_scheduler_type",
            "lr_scheduler_args",
            "lr_decay_steps",
            "lr_scheduler_timescale",
            "lr_scheduler_min_lr_ratio",
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
            "metadata_thumbnail",
            "metadata_merged_from",
            "metadata_preprocessor",
            "metadata_is_negative_embedding",
        ),
        _LATER,
    ),
    **dict.fromkeys(
        ("deepspeed", *_DEEPSPEED_OPTIONS),
        "DeepSpeed is set up in an accelerate config (distributed_type: DEEPSPEED, deepspeed_config), started with "
        "sdtool train --accelerate-config FILE or accelerate launch; see docs/multi-gpu.md",
    ),
    "color_aug": "not cacheable and unusable in kohya's fine_tune.py; not implemented",
    "random_crop": "not cacheable and unusable in kohya's fine_tune.py; not implemented",
    "face_crop_aug_range": "dead in kohya's fine_tune.py; not implemented",
    "alpha_mask": "kohya's fine_tune.py never applies a masked loss; not implemented",
    "fp8_base": "not implemented (kohya's fine_tune.py ignores it too)",
    "v_pred_like_loss": "ignored by kohya's fine_tune.py; not implemented",
    "diffusers_xformers": "a no-op in kohya that disables attention replacement; use xformers = true",
    "lowram": "not implemented",
    "highvram": "not implemented",
    "dataset_class": "arbitrary dataset classes are not supported",
    "debug_dataset": "use sdtool train --dry-run to inspect the dataset plan",
    "tokenizer_cache_dir": "sdtool always uses the model's own tokenizer",
    "skip_cache_check": "sdtool checks every cache entry and re-encodes stale ones",
    "cache_info": "DreamBooth-only in kohya",
    "console_log_level": "use sdtool -v / -q",
    "console_log_file": "use shell redirection of stderr",
    "console_log_simple": "use sdtool -v / -q",
    "network_multiplier": _NO_EFFECT,
    "custom_attributes": _NO_EFFECT,
    "class_tokens": "DreamBooth-only in kohya",
    "is_reg": "DreamBooth-only in kohya",
    "conditioning_data_dir": "ControlNet-only in kohya",
    "prior_loss_weight": "DreamBooth-only in kohya",
    "caption_extention": "kohya's misspelt alias; write caption_extension",
    "wandb_api_key": "a key in a config file ends up in logs and shell history; set WANDB_API_KEY or run wandb login",
    "config_file": "sdtool train takes the config file as its argument; a config cannot name another one",
    "output_config": "use sdtool train CONFIG --print-config",
}


# Each refused key's parser default first, then the other values kohya treats as "off" (see the module docstring).
# Defaults of None are not listed first: TOML cannot write None.
KOHYA_DEFAULTS: dict[str, tuple[Any, ...]] = {
    # train_util.add_dataset_arguments / config_util dataset schema
    "weighted_captions": (False,),
    "token_warmup_min": (1,),
    "token_warmup_step": (0, 0.0),
    "enable_wildcard": (False,),
    "color_aug": (False,),
    "random_crop": (False,),
    "face_crop_aug_range": ("",),
    "alpha_mask": (False,),
    "dataset_class": ("",),
    "debug_dataset": (False,),
    "skip_cache_check": (False,),
    "cache_info": (False,),
    "caption_extention": ("",),
    "custom_attributes": ({},),
    "class_tokens": ("",),
    "is_reg": (False,),
    "validation_split": (0, 0.0),
    "validation_seed": (),
    "network_multiplier": (1, 1.0),
    "prior_loss_weight": (1, 1.0),
    "conditioning_data_dir": ("",),
    # train_util.add_training_arguments
    "torch_compile": (False,),
    "dynamo_backend": ("inductor", "no"),
    "ddp_timeout": (0,),  # used as `if args.ddp_timeout`
    "ddp_gradient_as_bucket_view": (False,),
    "ddp_static_graph": (False,),
    "lowram": (False,),
    "highvram": (False,),
    "fp8_base": (False,),
    "huggingface_repo_id": ("",),
    "huggingface_repo_type": ("",),
    "huggingface_path_in_repo": ("",),
    "huggingface_token": ("",),
    "huggingface_repo_visibility": ("",),
    "save_state_to_huggingface": (False,),
    "resume_from_huggingface": (False,),
    "async_upload": (False,),
    "wandb_api_key": ("",),
    "config_file": ("",),
    "output_config": (False,),
    # train_util.add_sd_models_arguments, sai_model_spec.add_model_spec_arguments, utils.add_logging_arguments
    "tokenizer_cache_dir": ("",),
    "metadata_thumbnail": ("",),
    "metadata_merged_from": ("",),
    "metadata_preprocessor": ("",),
    "metadata_is_negative_embedding": ("",),
    "console_log_level": ("",),
    "console_log_file": ("",),
    "console_log_simple": (False,),
    # train_util.add_optimizer_arguments
    "lr_scheduler_type": ("",),
    "lr_scheduler_args": ([],),
    "lr_decay_steps": (0, 0.0),
    "lr_scheduler_timescale": (),
    "lr_scheduler_min_lr_ratio": (),
    # deepspeed_utils.add_deepspeed_arguments
    "deepspeed": (False,),
    "zero_stage": (2,),
    "offload_optimizer_device": ("",),
    "offload_optimizer_nvme_path": ("",),
    "offload_param_device": ("",),
    "offload_param_nvme_path": ("",),
    "zero3_init_flag": (False,),
    "zero3_save_16bit_model": (False,),
    "fp16_master_weights_and_gradients": (False,),
    # custom_train_functions.add_custom_train_arguments, fine_tune.py's own
    "v_pred_like_loss": (0, 0.0),  # used as `if args.v_pred_like_loss`
    "diffusers_xformers": (False,),
}


# Keys whose value matters only while another key is on.
ONLY_WITH: dict[str, str] = {
    "dynamo_backend": "torch_compile",
    **dict.fromkeys(_DEEPSPEED_OPTIONS, "deepspeed"),
}


# Keys sdtool implements whose "off" is None, which kohya's code tests by truthiness (`if args.min_snr_gamma:`),
# so GUIs write 0 for off; sdtool's range checks (γ > 0, iterations ≥ 1) would refuse that 0.
ZERO_MEANS_OFF = ("min_snr_gamma", "multires_noise_iterations", "ip_noise_gamma", "adaptive_noise_scale")


def drop_zero_offs(flat: dict[str, Any]) -> None:
    """Remove `ZERO_MEANS_OFF` keys written as 0 (kohya's "off"), naming each at -v."""
    from sdtool.console import debug

    for key in ZERO_MEANS_OFF:
        value = flat.get(key)
        if not isinstance(value, bool) and isinstance(value, int | float) and value == 0:
            del flat[key]
            debug(f"{key} = {value}: accepted as off, as in kohya")


def is_noop(key: str, value: Any, siblings: Mapping[str, Any]) -> bool:
    """Whether a refused kohya key, at this value, does nothing in kohya either (so it can be accepted).

    `siblings` are the keys beside it (the flattened config for top-level keys), for `ONLY_WITH`.
    """
    partner = ONLY_WITH.get(key)
    if partner is not None and not siblings.get(partner):
        return True
    # Compared with their types: TOML's true is not 1, and 1.0 stands for 1 only where the parser takes floats.
    return any(type(value) is type(default) and value == default for default in KOHYA_DEFAULTS.get(key, ()))
