"""kohya's `fine_tune.py` keys that sdtool knows but does not implement: each is refused by name, with the reason."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------
# kohya keys sdtool knows but does not implement: rejected by name with the reason, never accepted and ignored.
_LATER = "not implemented yet in sdtool"


_NO_EFFECT = "has no effect on SD1/2 fine-tuning in kohya either"


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
        (
            "deepspeed",
            "zero_stage",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients",
        ),
        "DeepSpeed is set up in an accelerate config (distributed_type: DEEPSPEED, deepspeed_config), started with "
        "sdtool train --accelerate-config FILE or accelerate launch; see README: Multi-GPU and multi-node",
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
    "skip_cache_check": "sdtool checks every cache entry; stale entries are refused",
    "vae_batch_size": "latents are encoded by sdtool cache, before training; use sdtool cache --batch-size",
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
}
