"""What `sdtool train CONFIG` does when it finds the outputs of an earlier run of the same config (CONTRACT §B:
rerunning continues where it stopped).

- The final model exists: the run is finished. Nothing is trained, and the command says so (exit 0).
- No final model, but state folders of this run (`<name>-state`, `<name>-<epoch>-state`, `<name>-step<step>-state`):
  the run was interrupted. It continues from the newest of them, once the config and the model are checked to be
  the ones that state was saved with (anything else is refused, naming what differs).
- Neither: the run starts at step 1. A `metrics.jsonl` left by a run that never saved a state is replaced.

`resume = "latest"` asks for that continuation explicitly (and starts at step 1 when there is no state yet),
`resume = "<state folder>"` continues from the named state (changes are allowed, with a warning), and
`overwrite = true` (`--overwrite`) starts again at step 1, replacing what the run writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sdtool.errors import ConfigError
from sdtool.train.config.schema import ResolvedConfig, TrainConfig
from sdtool.train.outputs import STATE_FILE, model_path

LATEST = "latest"


@dataclass(frozen=True)
class RunStart:
    """How this run begins: from step 1, from a state folder, or not at all because it is finished."""

    action: Literal["start", "resume", "finished"]
    state: Path | None = None
    reason: str = ""  # one line for the person: what was found and what happens
    warning: bool = False  # the reason is a warning (something earlier is replaced)


def state_folders(cfg: TrainConfig) -> list[Path]:
    """This run's state folders (named after its output_name) that hold a state file, newest first.

    Newest by the time the state was written: after an `overwrite` run saved step 100, the earlier run's step 500
    state is older and is not what an interruption left behind.
    """
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return []
    pattern = re.compile(re.escape(cfg.output_name) + r"(?:-\d{6}|-step\d{8})?-state")
    found = []
    for path in out.iterdir():
        record = path / STATE_FILE
        if pattern.fullmatch(path.name) and record.is_file():
            found.append((record.stat().st_mtime_ns, _saved_step(path), path))
    return [path for *_, path in sorted(found, key=lambda item: (item[0], item[1]), reverse=True)]


def _saved_step(path: Path) -> int:
    match = re.search(r"-step(\d{8})-state$", path.name)
    return int(match.group(1)) if match else -1


def decide_start(cfg: ResolvedConfig) -> RunStart:
    """What this run does, given what its output folder holds (see the module docstring). Raises ConfigError when
    an interrupted run cannot continue with this config."""
    t = cfg.train
    final = model_path(t, t.output_name)
    if t.resume not in (None, LATEST):
        state = Path(t.resume)
        if final.exists() and not t.overwrite:
            raise ConfigError(
                f"output_name: {final} already exists and resuming would replace it",
                hint="pass --overwrite (overwrite = true) to continue this state and replace the model",
            )
        return RunStart("resume", state)  # the recipe says where it resumed
    if t.overwrite:
        return RunStart("start", reason="overwrite: the run starts at step 1 and replaces its earlier outputs")
    if final.exists():
        states = state_folders(t)
        more = f"; to train it further: --set resume={states[0]}" if states else ""
        return RunStart("finished", reason=f"{final} exists: this run is finished (--overwrite trains it again{more})")
    states = state_folders(t)
    if states:
        state = states[0]
        if t.resume is None:
            check_same_run(cfg, state)
        return RunStart("resume", state, f"this run was interrupted: continuing from {state}")
    metrics = Path(t.output_dir) / "metrics.jsonl"
    if metrics.exists():
        return RunStart(
            "start",
            reason=f"no state of '{t.output_name}' to continue from: starting at step 1 (replacing {metrics})",
            warning=True,
        )
    if t.resume == LATEST:
        return RunStart("start", reason="resume = 'latest': no state folder yet, starting at step 1")
    return RunStart("start")


def check_same_run(cfg: ResolvedConfig, state: Path) -> None:
    """A state found by itself is continued only with the config and the model it was saved with."""
    from sdtool.train.checkpoints import check_resume_config, config_record, model_identity, read_state

    saved = read_state(state)
    current = config_record(cfg)
    current["seed"] = cfg.train.seed if cfg.train.seed is not None else saved["config"].get("seed")
    check_resume_config(
        saved["config"],
        current,
        cfg.train.use_ema,
        bool(saved.get("ema")),
        strict=True,
        hint=f"pass --overwrite to start again at step 1, or --set resume={state} to continue with these changes",
    )
    recorded = saved.get("model")
    if recorded is not None and recorded != model_identity(cfg.train.pretrained_model_name_or_path):
        raise ConfigError(
            f"pretrained_model_name_or_path: the model's weights changed since {state} was saved",
            hint=f"pass --overwrite to start again at step 1, or --set resume={state} to continue anyway",
        )


def rerun_command(argv: list[str]) -> list[str]:
    """The command line that continues this run: the same, minus any `--set resume=…` (the caller adds its own)."""
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--set" and i + 1 < len(argv) and is_resume_override(argv[i + 1]):
            skip = True
            continue
        if arg.startswith("--set=") and is_resume_override(arg[len("--set=") :]):
            continue
        kept.append(arg)
    return kept


def is_resume_override(item: str) -> bool:
    """Whether a `--set` item sets `resume`."""
    return item.partition("=")[0].strip() == "resume"
