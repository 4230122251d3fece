"""Cross-key and path checks that types alone cannot express; every problem is collected, none raised one by one."""

from __future__ import annotations

import difflib
import json
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sdtool.errors import ConfigError, SdtoolError
from sdtool.fsutil import folder_is_replaceable, writable_problem
from sdtool.train.config.files import format_validation, hub_id_like, read_toml, resolve_path
from sdtool.train.config.schema import HYPERNETWORK_KEYS, LR_SCHEDULERS, OPTIMIZERS, DatasetSpec, TrainConfig


def check_train(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Cross-key checks and path checks that the types alone cannot express."""
    src = cfg.pretrained_model_name_or_path
    local = resolve_path(src, base)
    if local.exists():
        cfg.pretrained_model_name_or_path = str(local)
    elif not hub_id_like(src):
        problems.append(f"pretrained_model_name_or_path: {local} does not exist (and is not a hub id owner/name)")
    if cfg.vae is not None:
        vae = resolve_path(cfg.vae, base)
        if vae.exists():
            cfg.vae = str(vae)
        elif not hub_id_like(cfg.vae):
            problems.append(f"vae: {vae} does not exist")
    _check_hypernetwork(cfg, base, problems)  # first: it settles save_model_as, which names the output below
    cfg.output_dir = str(resolve_path(cfg.output_dir, base))
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"output_dir: {cfg.output_dir} exists and is not a folder; name a folder")
    else:
        unwritable = writable_problem(cfg.output_dir)
        if unwritable is not None:
            problems.append(f"output_dir: {unwritable}; choose a folder you can write to")
    name_problem = output_name_problem(cfg)
    if name_problem is not None:
        problems.append(f"output_name: {name_problem}")
    # Outputs already there are not a config problem: a rerun continues or reports a finished run (train/rerun.py),
    # so --print-config and --dry-run work whatever the output folder holds.
    if name_problem is None and cfg.save_model_as.startswith("diffusers"):
        from sdtool.models.saving import DIFFUSERS_MARKERS
        from sdtool.train.outputs import model_path

        final = model_path(cfg, cfg.output_name)
        if final.is_dir() and not folder_is_replaceable(final, DIFFUSERS_MARKERS):
            problems.append(
                f"output_name: {final} is a folder of other files, not a model sdtool wrote, and is never replaced; "
                "choose another output_name or output_dir"
            )
    _check_long_run(cfg, base, problems)
    _check_model_flags(cfg, problems)

    if cfg.optimizer_type == "":
        cfg.optimizer_type = "AdamW"  # kohya's parser default "" means AdamW (or the legacy flags below)
    if cfg.use_8bit_adam or cfg.use_lion_optimizer:
        legacy = "AdamW8bit" if cfg.use_8bit_adam else "Lion"
        if cfg.use_8bit_adam and cfg.use_lion_optimizer:
            problems.append("use_8bit_adam/use_lion_optimizer: set at most one")
        elif cfg.optimizer_type.lower() not in ("adamw", legacy.lower()):
            problems.append(
                f"use_8bit_adam/use_lion_optimizer: contradicts optimizer_type = {cfg.optimizer_type!r}; "
                f"remove the old flag and write optimizer_type = '{legacy}'"
            )
        else:
            cfg.optimizer_type = legacy
    _check_optimizer(cfg, problems)
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        close = difflib.get_close_matches(cfg.lr_scheduler, LR_SCHEDULERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(LR_SCHEDULERS)}"
        problems.append(f"lr_scheduler: unknown scheduler {cfg.lr_scheduler!r}{hint}")
    if isinstance(cfg.lr_warmup_steps, float) and not cfg.lr_warmup_steps < 1:
        problems.append("lr_warmup_steps: a float is a ratio of the total steps and must be < 1")
    if cfg.use_safetensors and cfg.save_model_as in ("ckpt", "diffusers"):
        problems.append(f"use_safetensors: contradicts save_model_as = {cfg.save_model_as!r}; remove one of the two")

    if cfg.full_fp16 and cfg.full_bf16:
        problems.append("full_fp16/full_bf16: choose one")
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        problems.append("full_fp16: needs mixed_precision = 'fp16'")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        problems.append("full_bf16: needs mixed_precision = 'bf16'")
    if cfg.mixed_precision == "fp16" and not cuda_available():
        problems.append("mixed_precision: fp16 needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    attention = [key for key in ("sdpa", "xformers", "mem_eff_attn") if getattr(cfg, key)]
    if len(attention) > 1:  # kohya silently lets one win
        problems.append(f"{'/'.join(attention)}: choose one attention implementation")
    if cfg.xformers:
        import importlib.util

        if not cuda_available():
            problems.append("xformers: needs a CUDA GPU; remove it to use PyTorch SDPA attention (the default)")
        elif importlib.util.find_spec("xformers") is None:
            problems.append(
                "xformers: the xformers package is not installed; pip install 'sdtool[xformers]', or remove it "
                "to use PyTorch SDPA attention (the default)"
            )

    if cfg.learning_rate_te is not None and not cfg.train_text_encoder:
        problems.append(
            "learning_rate_te: set, but train_text_encoder is off; set train_text_encoder = true or remove it"
        )
    lo = cfg.min_timestep if cfg.min_timestep is not None else 0
    hi = cfg.max_timestep if cfg.max_timestep is not None else 1000
    if lo >= hi:
        problems.append(f"min_timestep/max_timestep: need min < max (got {lo} and {hi})")
    if cfg.noise_offset and cfg.multires_noise_iterations:
        problems.append("noise_offset/multires_noise_iterations: choose one kind of extra noise")
    if cfg.adaptive_noise_scale is not None and cfg.noise_offset is None:
        problems.append("adaptive_noise_scale: needs noise_offset; set noise_offset or remove adaptive_noise_scale")
    if cfg.scale_v_pred_loss_like_noise_pred and cfg.v_parameterization is False:
        problems.append(
            "scale_v_pred_loss_like_noise_pred: needs a v-prediction model; remove it or v_parameterization = false"
        )
    if cfg.huber_schedule != "snr" and cfg.loss_type not in ("huber", "smooth_l1"):
        problems.append("huber_schedule: only used with loss_type huber or smooth_l1; remove it or set loss_type")
    if cfg.cache_latents_to_disk:
        if "cache_latents" in cfg.model_fields_set and not cfg.cache_latents:
            problems.append("cache_latents_to_disk: contradicts cache_latents = false; remove one of the two")
        cfg.cache_latents = True  # as kohya: caching to disk is caching
    if cfg.vae_batch_size != 1 and not cfg.cache_latents:
        problems.append("vae_batch_size: only used by cache_latents (the VAE batch that encodes before training)")


def output_name_problem(cfg: TrainConfig) -> str | None:
    """Why `output_name` cannot name files, or None: a plain name, no control characters, short enough for every
    file a run derives from it (periodic saves, state folders and their temp names) to fit the 255-byte limit."""
    from sdtool.train.outputs import model_path, save_stem, state_path

    name = cfg.output_name
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return f"{name!r} must be a plain file name (no folders)"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return f"{name!r} has control characters; use a plain file name"
    stem = save_stem(name, step=0)
    names = (model_path(cfg, stem).name, state_path(cfg, stem).name)
    longest = max(len(n.encode("utf-8", "surrogateescape")) for n in names)
    if longest + len(".0123abcd.tmp") + 1 > NAME_MAX:
        return f"is too long: the files named after it must fit {NAME_MAX} bytes; shorten it"
    return None


NAME_MAX = 255  # bytes in a file name on every common file system


def check_outputs_apart(cfg: TrainConfig, datasets: list[DatasetSpec], problems: list[str]) -> None:
    """Training writes into output_dir (models, states, sample images): it must not be a dataset's image folder."""
    out = Path(cfg.output_dir).absolute()
    for d, spec in enumerate(datasets):
        for s, sub in enumerate(spec.subsets):
            if sub.image_dir is not None and _same_folder(Path(sub.image_dir), out):
                problems.append(
                    f"output_dir: {out} is the image_dir of datasets[{d}].subsets[{s}]; samples and models would be "
                    "written among the training images; choose another folder"
                )


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a.absolute() == b.absolute()


def check_validation(cfg: TrainConfig, datasets: list[Any], problems: list[str]) -> None:
    """Validation keys (CONTRACT §O): they need validation images, timesteps on the schedule, EMA for
    `validation_weights`, and some training data left over."""
    has_validation = any(d.validation or d.validation_split > 0 for d in datasets)
    wants = [
        key
        for key in ("validate_every_n_steps", "validate_every_n_epochs", "validation_weights", "save_best")
        if getattr(cfg, key) not in (None, False)
    ]
    if "validation_timesteps" in cfg.model_fields_set and cfg.validation_timesteps != 4:
        wants.append("validation_timesteps")
    if wants and datasets and not has_validation:
        problems.append(
            f"{'/'.join(wants)}: no validation images; set validation_split (e.g. 0.1) or add a [[datasets]] "
            "table with validation = true"
        )
    if datasets and all(d.validation for d in datasets):
        problems.append("datasets: every dataset has validation = true; nothing is left to train on")
    if cfg.validation_weights is not None and not cfg.use_ema:
        problems.append("validation_weights: chooses between the EMA and the trained weights; needs use_ema = true")
    steps = cfg.validation_timesteps
    if isinstance(steps, int):
        if not 1 <= steps <= 100:
            problems.append(f"validation_timesteps: a count from 1 to 100, or a list of timesteps (got {steps})")
    elif not steps or len(set(steps)) != len(steps) or any(not 0 <= s < 1000 for s in steps):
        problems.append(f"validation_timesteps: a list of distinct timesteps from 0 to 999, or a count (got {steps})")


def _check_model_flags(cfg: TrainConfig, problems: list[str]) -> None:
    """`v_parameterization` against a local diffusers folder's own JSON configs, before any weights load (`v2` is
    checked against the family by `check_family`).

    Only the small config files are read: a contradiction is a config problem (exit 2) and must not wait for the
    weights (a single file or a hub id is checked when it loads, which is as early as its type can be known).
    """

    folder = Path(cfg.pretrained_model_name_or_path)
    if cfg.v_parameterization is None or not (folder / "unet" / "config.json").is_file():
        return

    scheduler = _config_json(folder / "scheduler/scheduler_config.json")
    if cfg.v_parameterization is not None and scheduler is not None:
        predicts = scheduler.get("prediction_type", "epsilon")
        if cfg.v_parameterization != (predicts == "v_prediction"):
            problems.append(
                f"v_parameterization: v_parameterization = {str(cfg.v_parameterization).lower()} contradicts the "
                f"model in {folder}, whose scheduler predicts {predicts}; remove v_parameterization "
                "(it is read from the model)"
            )


def _check_long_run(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Saves, resume, EMA, samples and logging: keys that only work together are checked together."""
    import importlib.util

    every_epochs = cfg.save_every_n_epochs is not None or cfg.save_n_epoch_ratio is not None
    if cfg.save_every_n_epochs is not None and cfg.save_n_epoch_ratio is not None:
        problems.append("save_n_epoch_ratio: sets save_every_n_epochs from the epoch count; set only one of the two")
    needs = {
        "save_last_n_epochs": (every_epochs, "needs save_every_n_epochs (or save_n_epoch_ratio)"),
        "save_last_n_steps": (cfg.save_every_n_steps is not None, "needs save_every_n_steps"),
        "save_last_n_epochs_state": (every_epochs and cfg.save_state, "needs save_every_n_epochs and save_state"),
        "save_last_n_steps_state": (
            cfg.save_every_n_steps is not None and cfg.save_state,
            "needs save_every_n_steps and save_state",
        ),
        "ema_decay": (cfg.use_ema, "needs use_ema = true"),
        "offload_ema": (cfg.use_ema, "needs use_ema = true"),
    }
    for key, (ok, why) in needs.items():
        # A default value (as --print-config writes it) is not a request.
        if getattr(cfg, key) not in (None, False, TrainConfig.model_fields[key].default) and not ok:
            problems.append(f"{key}: {why}")

    if cfg.resume is not None and cfg.resume != "latest":  # "latest": the newest state of this run (rerun.py)
        from sdtool.train.outputs import STATE_FILE

        state = resolve_path(cfg.resume, base)
        cfg.resume = str(state)
        if not state.exists():
            from sdtool.fsutil import clean_leftovers_of

            clean_leftovers_of(state)  # a kill mid-replacement of this state: put it back
        if not (state / STATE_FILE).is_file():
            what = "is not an sdtool state folder" if state.is_dir() else "does not exist"
            problems.append(
                f"resume: {state} {what} (expected {STATE_FILE} in a <name>-state folder, or resume = 'latest')"
            )
        else:
            _check_resume_family(cfg, state / STATE_FILE, problems)

    scheduled = cfg.sample_every_n_steps is not None or cfg.sample_every_n_epochs is not None or cfg.sample_at_first
    if cfg.sample_prompts is None:
        if scheduled:
            problems.append("sample_every_n_steps/sample_every_n_epochs/sample_at_first: need sample_prompts")
        if cfg.sample_sampler != TrainConfig.model_fields["sample_sampler"].default:
            problems.append("sample_sampler: needs sample_prompts")
    else:
        prompts = resolve_path(cfg.sample_prompts, base)
        cfg.sample_prompts = str(prompts)
        if not scheduled:
            problems.append(
                "sample_prompts: set, but no sample_every_n_steps, sample_every_n_epochs or sample_at_first says when"
            )
        _check_samples(cfg, prompts, problems)

    if cfg.logging_dir is not None:
        cfg.logging_dir = str(resolve_path(cfg.logging_dir, base))
        if Path(cfg.logging_dir).exists() and not Path(cfg.logging_dir).is_dir():
            # Found only when the tracker starts, after the model loaded.
            problems.append(f"logging_dir: {cfg.logging_dir} exists and is not a folder; name a folder")
        if cfg.log_with is None:
            cfg.log_with = "tensorboard"  # kohya's default when a logging folder is given
    elif cfg.log_with in ("tensorboard", "all"):
        problems.append(f"log_with: {cfg.log_with} needs logging_dir; set logging_dir = '<folder>'")
    if cfg.log_with is None:
        for key in ("log_prefix", "log_tracker_name", "log_tracker_config", "log_config", "wandb_run_name"):
            if getattr(cfg, key) not in (None, False):
                problems.append(f"{key}: needs logging_dir or log_with")
    for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if cfg.log_with in (tracker, "all") and importlib.util.find_spec(package) is None:
            problems.append(f"log_with: {tracker} needs the package {package!r}, which is not installed")
    if cfg.wandb_run_name is not None and cfg.log_with not in ("wandb", "all", None):
        problems.append("wandb_run_name: needs log_with = 'wandb' or 'all'")
    if cfg.log_tracker_config is not None:
        tracker_config = resolve_path(cfg.log_tracker_config, base)
        cfg.log_tracker_config = str(tracker_config)
        try:
            read_toml(tracker_config, "log_tracker_config")
        except ConfigError as exc:
            problems.extend(exc.problems)


def _check_resume_family(cfg: TrainConfig, state_file: Path, problems: list[str]) -> None:
    """A state trained on one model family cannot resume on another (its weights have other shapes): said here when
    the state records its family and the model is a local diffusers folder, instead of after the model loaded."""
    from sdtool.fsutil import CONFIG_LIMIT, read_regular_file
    from sdtool.models import families

    try:
        saved = json.loads(read_regular_file(state_file, CONFIG_LIMIT, "state file")).get("model_family")
    except (OSError, ValueError, AttributeError, SdtoolError):
        return  # unreadable: the resume itself reports it
    folder = Path(cfg.pretrained_model_name_or_path)
    if saved not in families.NAMES or not (folder / "unet" / "config.json").is_file():
        return

    current = families.detect_configs(
        _config_json(folder / "unet/config.json"), _config_json(folder / "text_encoder/config.json")
    )
    if current is not None and current.name != saved:
        problems.append(
            f"resume: the state was trained on an {families.by_name(saved).title} model, but {folder} is "
            f"{current.title}; resume with the model the state was saved from"
        )


def _check_hypernetwork(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Hypernetwork keys: valid values, a readable weights file that agrees with them, and no contradicting keys.

    A hypernetwork run writes only an A1111 `.pt` file, so `save_model_as` is "pt" there (set when left unset) and
    nowhere else.
    """
    if not cfg.train_hypernetwork:
        for key in HYPERNETWORK_KEYS:
            if key in cfg.model_fields_set and getattr(cfg, key) != TrainConfig.model_fields[key].get_default(
                call_default_factory=True
            ):
                problems.append(f"{key}: needs train_hypernetwork = true")
        if cfg.save_model_as == "pt":
            problems.append("save_model_as: 'pt' is the hypernetwork file format; it needs train_hypernetwork = true")
        return
    from sdtool.console import warn
    from sdtool.errors import SdtoolError
    from sdtool.train.hypernetwork.network import Hypernetwork
    from sdtool.train.hypernetwork.options import options_problems
    from sdtool.train.hypernetwork.structure import portability_warning
    from sdtool.train.hypernetwork.training import options_from

    if cfg.train_text_encoder:
        problems.append(
            "train_text_encoder: contradicts train_hypernetwork (a hypernetwork trains on a frozen text encoder)"
        )
    if "save_model_as" in cfg.model_fields_set and cfg.save_model_as != "pt":
        problems.append(
            f"save_model_as: a hypernetwork run writes an A1111 .pt file, not {cfg.save_model_as!r}; "
            "remove save_model_as or set it to 'pt'"
        )
    cfg.save_model_as = "pt"
    if cfg.use_safetensors:
        problems.append("use_safetensors: a hypernetwork run writes an A1111 .pt file")
    if cfg.save_precision not in (None, "float", "fp32"):
        problems.append("save_precision: hypernetwork files are written in float32, as A1111 writes them")
    if cfg.mem_eff_attn:
        problems.append("mem_eff_attn: hypernetwork attention runs on PyTorch SDPA or xformers; remove mem_eff_attn")
    if cfg.hypernetwork_weights is not None:
        weights = resolve_path(cfg.hypernetwork_weights, base)
        cfg.hypernetwork_weights = str(weights)
        if not weights.is_file():
            problems.append(f"hypernetwork_weights: {weights} does not exist")
            return
    try:
        options = options_from(cfg)
    except ValidationError as exc:
        format_validation(exc, "", problems)
        return
    if options.hypernetwork_weights is not None:
        try:
            loaded = Hypernetwork.load(options.hypernetwork_weights)
        except SdtoolError as exc:
            problems.append(f"hypernetwork_weights: {exc.one_line()}")
            return
        contradictions = options_problems(loaded, options)
        problems.extend(contradictions)
        if contradictions:
            return
        # The file's structure wins; the resolved config (--print-config, the state's record) says what it is.
        cfg.hypernetwork_layer_structure = [float(x) for x in loaded.layer_structure]
        cfg.hypernetwork_activation = loaded.activation or "linear"
        cfg.hypernetwork_layer_norm = loaded.layer_norm
        cfg.hypernetwork_dropout = list(loaded.dropout_structure)
    portability = portability_warning(cfg.hypernetwork_activation)
    if portability:
        warn(portability)


def _check_samples(cfg: TrainConfig, prompts: Path, problems: list[str]) -> None:
    """The prompt file parses and the sampler exists, before any model loads."""
    from sdtool.errors import SdtoolError
    from sdtool.train.sample_prompts import check_sampler, read_sample_prompts

    try:
        cfg.sample_sampler = check_sampler(cfg.sample_sampler)
    except SdtoolError as exc:
        problems.append(f"sample_sampler: {exc.one_line()}")
    if not prompts.is_file():
        problems.append(f"sample_prompts: {prompts} does not exist")
        return
    try:
        if not read_sample_prompts(prompts):
            problems.append(f"sample_prompts: {prompts} has no prompts")
    except SdtoolError as exc:
        problems.append(f"sample_prompts: {exc.one_line()}")


def _check_optimizer(cfg: TrainConfig, problems: list[str]) -> None:
    import importlib.util

    name = cfg.optimizer_type
    canonical = OPTIMIZERS.get(name.lower())
    if canonical is None and "." not in name:
        close = difflib.get_close_matches(name.lower(), list(OPTIMIZERS), n=1)
        hint = f"; did you mean '{OPTIMIZERS[close[0]]}'?" if close else ""
        problems.append(f"optimizer_type: unknown optimizer {name!r}{hint} (or give a dotted class path)")
        return
    if canonical is not None:
        cfg.optimizer_type = canonical
        needs = {"Lion": "lion_pytorch", "Prodigy": "prodigyopt"}.get(canonical)
        if "8bit" in canonical.lower():
            needs = "bitsandbytes"
        if needs and importlib.util.find_spec(needs) is None:
            problems.append(f"optimizer_type: {canonical} needs the package {needs!r}, which is not installed")
    else:
        # Only the top-level package is looked up: find_spec("pkg.mod") would import (run) `pkg` to search it, and
        # validating a config must run nothing. The class itself is imported when training builds the optimizer.
        module = name.rsplit(".", 1)[0]
        top = module.split(".", 1)[0]
        try:
            found = bool(top) and importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            problems.append(f"optimizer_type: cannot find the package {top!r} (of {name!r}); is it installed?")
    from sdtool.train.optim import parse_optimizer_args

    try:
        parse_optimizer_args(cfg.optimizer_args)
    except ConfigError as exc:
        problems.extend(exc.problems)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _config_json(path: Path) -> dict[str, Any] | None:
    """A model config's JSON object, or None when it cannot be read (the model's loading reports that)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
