"""Fine-tune a Stable Diffusion model from a TOML config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import ConfigArg, flag

NAME = "train"

# The launcher passes its own command line to the processes it starts, so that a stopped run names the command a
# person typed (with --num-processes …), not the one each process was started with.
COMMAND_ENV = "SDTOOL_TRAIN_COMMAND"


def command(
    config: ConfigArg,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config key: key=value, e.g. learning_rate=1e-6 (repeatable; default: none).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        flag(
            "--overwrite",
            help="Train again from step 1, replacing an earlier run's outputs (same as --set overwrite=true). "
            "Without it a rerun continues an interrupted run, and a finished run is left as it is.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, flag("--dry-run", help="Validate, load the dataset, print the plan; do not train.")
    ] = False,
    print_config: Annotated[bool, flag("--print-config", help="Print the resolved config as TOML.")] = False,
    num_processes: Annotated[
        int | None,
        typer.Option("--num-processes", min=1, help="Launch this many processes in all (default: this one)."),
    ] = None,
    num_machines: Annotated[
        int | None, typer.Option("--num-machines", min=1, help="Machines taking part (default: 1).")
    ] = None,
    machine_rank: Annotated[
        int | None, typer.Option("--machine-rank", min=0, help="This machine's rank (default: 0).")
    ] = None,
    main_process_ip: Annotated[
        str | None, typer.Option("--main-process-ip", help="Address of the rank-0 machine (default: this one).")
    ] = None,
    main_process_port: Annotated[
        int | None, typer.Option("--main-process-port", help="Port of the rank-0 machine (default: a free one).")
    ] = None,
    accelerate_config: Annotated[
        Path | None,
        typer.Option("--accelerate-config", help="An accelerate config file to launch with (default: plain DDP)."),
    ] = None,
) -> None:
    """Fine-tune a Stable Diffusion model from a TOML config."""
    import json
    import os

    from sdtool.console import error_line, info, mute_secondary_process, warn
    from sdtool.errors import ConfigError, SdtoolError
    from sdtool.launch import LaunchOptions, process_rank

    launch = LaunchOptions(
        num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config
    )
    if process_rank() != 0:
        mute_secondary_process()  # only rank 0 reports; errors still come from every rank
    from sdtool.train.config import load_config
    from sdtool.train.rerun import decide_start, is_resume_override, rerun_command

    overrides = [*(set_ or []), *(["overwrite=true"] if overwrite else [])]
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        # Every problem on its own line, so a user fixes them all in one go.
        for problem in exc.problems:
            error_line(problem)
        raise typer.Exit(exc.exit_code) from None
    if print_config and process_rank() == 0:
        typer.echo(cfg.to_toml(), nl=False)
    if print_config and not dry_run:
        return

    # What the output folder holds decides how the run begins: from step 1, from the newest state of an interrupted
    # run, or not at all (finished). A dry run only says what a real run would do.
    try:
        start = decide_start(cfg)
    except ConfigError as exc:
        if not dry_run:
            raise
        warn(f"a real run would stop here: {exc.one_line()}")
        start = None
    if start is not None:
        if start.action == "finished":
            info(start.reason)
            if not dry_run:
                typer.echo(str(cfg.output_path))
                return
        elif start.reason:
            (warn if start.warning else info)(("a real run would go on like this: " if dry_run else "") + start.reason)
        cfg.train.resume = str(start.state) if start.state is not None else None

    own_command = ["sdtool", "train", str(config), *(x for s in set_ or [] for x in ("--set", s))]
    own_command += ["--overwrite"] * overwrite
    if launch.given():
        # The config is valid: start the processes, each of them a plain `sdtool train` (see sdtool/launch.py).
        from sdtool.console import QUIET, VERBOSE, verbosity
        from sdtool.launch import run_launch

        level = {VERBOSE: ["-v"], QUIET: ["-q"]}.get(verbosity(), [])
        sets = [s for s in overrides if not is_resume_override(s)]
        if cfg.train.resume is not None:
            sets.append(f"resume={cfg.train.resume}")  # every process continues the state this one chose
        args = [*level, "train", str(config.resolve()), *(x for s in sets for x in ("--set", s))]
        typed = own_command + launch.flags()
        code = run_launch(launch, args + ["--dry-run"] * dry_run, env={COMMAND_ENV: json.dumps(typed)})
        if code:
            raise typer.Exit(code)
        return
    from sdtool.train.memory import estimate_memory
    from sdtool.train.plan import make_plan, print_plan
    from sdtool.train.recipe import FineTuneRecipe

    plan = make_plan(cfg)
    print_plan(cfg, plan)
    if dry_run:
        if cfg.train.cache_latents:
            where = "to the cache folder" if cfg.train.cache_latents_to_disk else "in memory"
            n = len(plan.to_encode)
            info(f"cached latents: {len(plan.items) - n} ok, {n} to encode {where} before the first step")
            from rich.markup import escape

            from sdtool.console import debug

            for item, why in plan.to_encode:
                debug(escape(f"  to encode: {item.image} ({why})"))
        try:
            lines = estimate_memory(cfg, plan.processes).lines()
        except SdtoolError as exc:  # a hub model that is not cached and cannot be fetched
            lines = [f"memory estimate: not available ({exc.one_line()})"]
        except (OSError, ValueError) as exc:  # e.g. a pickled single file, whose family is known once it loads
            lines = [f"memory estimate: not available ({' '.join(str(exc).split())[:200]})"]
        for line in lines:
            info(line)
        info("dry run: nothing trained")
        return
    typed = json.loads(os.environ[COMMAND_ENV]) if os.environ.get(COMMAND_ENV) else own_command
    out = FineTuneRecipe(cfg, plan, rerun_command(typed)).run()
    if out is not None:
        typer.echo(str(out))
