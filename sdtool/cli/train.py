"""Fine-tune a Stable Diffusion model from a TOML config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "train"
NO_ARGS_IS_HELP = True


def command(
    config: Annotated[Path, typer.Argument(help="Training config (TOML, kohya key names).", show_default=False)],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config key: key=value (repeatable), e.g. resume=out/m-state.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate, load the dataset, print the plan; do not train.")
    ] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as TOML.")] = False,
    num_processes: Annotated[
        int | None,
        typer.Option("--num-processes", min=1, help="Launch this many processes in all (accelerate launch)."),
    ] = None,
    num_machines: Annotated[int | None, typer.Option("--num-machines", min=1, help="Machines taking part.")] = None,
    machine_rank: Annotated[int | None, typer.Option("--machine-rank", min=0, help="This machine's rank.")] = None,
    main_process_ip: Annotated[
        str | None, typer.Option("--main-process-ip", help="Address of the rank-0 machine.")
    ] = None,
    main_process_port: Annotated[
        int | None, typer.Option("--main-process-port", help="Port of the rank-0 machine.")
    ] = None,
    accelerate_config: Annotated[
        Path | None, typer.Option("--accelerate-config", help="An accelerate config file to launch with.")
    ] = None,
) -> None:
    """Fine-tune a Stable Diffusion model from a TOML config."""
    from sdtool.console import error_line, mute_secondary_process
    from sdtool.errors import ConfigError
    from sdtool.launch import LaunchOptions, process_rank

    launch = LaunchOptions(
        num_processes, num_machines, machine_rank, main_process_ip, main_process_port, accelerate_config
    )
    if process_rank() != 0:
        mute_secondary_process()  # only rank 0 reports; errors still come from every rank
    from sdtool.train.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        # Every problem on its own line, so a user fixes them all in one go.
        for problem in exc.problems:
            error_line(problem)
        raise typer.Exit(exc.exit_code) from None
    if print_config and process_rank() == 0:
        typer.echo(cfg.to_toml(), nl=False)
    if print_config and not dry_run:
        return
    if launch.given():
        # The config is valid: start the processes, each of them a plain `sdtool train` (see sdtool/launch.py).
        from sdtool.console import QUIET, VERBOSE, verbosity
        from sdtool.launch import run_launch

        level = {VERBOSE: ["-v"], QUIET: ["-q"]}.get(verbosity(), [])
        args = [*level, "train", str(config.resolve()), *(x for s in set_ or [] for x in ("--set", s))]
        code = run_launch(launch, args + ["--dry-run"] * dry_run)
        if code:
            raise typer.Exit(code)
        return
    from sdtool.train.memory import estimate_memory
    from sdtool.train.plan import make_plan, print_plan
    from sdtool.train.recipe import FineTuneRecipe

    plan = make_plan(cfg)
    print_plan(cfg, plan)
    if dry_run:
        from sdtool.console import info

        if cfg.train.cache_latents:
            from sdtool.train.dataset import cache_problems, training_vae_fingerprint

            t = cfg.train
            missing, stale = cache_problems(
                plan.items, plan.subsets, training_vae_fingerprint(t.vae, t.pretrained_model_name_or_path)
            )
            ok = len(plan.items) - len(missing) - len(stale)
            info(f"cached latents: {ok} ok, {len(missing)} missing, {len(stale)} stale")
        try:
            lines = estimate_memory(cfg, plan.processes).lines()
        except (OSError, ValueError) as exc:
            lines = [f"memory estimate: not available ({exc})"]
        for line in lines:
            info(line)
        info("dry run: nothing trained")
        return
    out = FineTuneRecipe(cfg, plan).run()
    if out is not None:
        typer.echo(str(out))
