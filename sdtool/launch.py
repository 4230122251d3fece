"""Starting a command on several processes or machines through `accelerate launch`, and knowing which one we are.

`sdtool train --num-processes N …` re-runs itself as `accelerate launch … -m sdtool train CONFIG …`; each child is a
plain `sdtool train` that finds its rank and the world size in the environment torchrun / accelerate set, exactly
as when a user starts `accelerate launch -m sdtool train …` or `torchrun --nproc_per_node N -m sdtool train …`.
Nothing here imports torch, so `--help` stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdtool.errors import MissingDependencyError, UsageError

# torchrun / accelerate set RANK and WORLD_SIZE; MPI launchers (accelerate's multi-CPU mode) set their own names.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            return int(value)
    return default


def process_rank() -> int:
    """This process's global rank in a launched run (0 when started plainly)."""
    return _env_int(_RANK_VARS, 0)


def world_size() -> int:
    """Processes in this run, as the launcher announces it (1 when started plainly)."""
    return _env_int(_WORLD_VARS, 1)


def local_rank() -> int:
    """This process's rank on its own machine (which GPU it uses); 0 when started plainly."""
    return _env_int(_LOCAL_RANK_VARS, 0)


@dataclass
class LaunchOptions:
    """What `accelerate launch` needs; `num_processes` counts all processes on all machines, like accelerate."""

    num_processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    config_file: Path | None = None

    def given(self) -> bool:
        return any(v is not None for v in vars(self).values())

    def flags(self) -> list[str]:
        """The `sdtool train` flags that give these options, as a person types them."""
        names = {
            "num_processes": "--num-processes",
            "num_machines": "--num-machines",
            "machine_rank": "--machine-rank",
            "main_process_ip": "--main-process-ip",
            "main_process_port": "--main-process-port",
            "config_file": "--accelerate-config",
        }
        return [x for key, flag in names.items() if (v := getattr(self, key)) is not None for x in (flag, str(v))]


def check_launch(options: LaunchOptions) -> None:
    """Refuse launches that cannot work, before any process starts (all problems at once)."""
    problems = []
    if world_size() > 1:
        problems.append("this process is already part of a launched run; start it without the launch options")
    machines = options.num_machines or 1
    if machines > 1:
        missing = [
            flag
            for flag, value in (
                ("--machine-rank", options.machine_rank),
                ("--main-process-ip", options.main_process_ip),
                ("--main-process-port", options.main_process_port),
            )
            if value is None
        ]
        if missing:
            problems.append(f"--num-machines {machines} needs {', '.join(missing)} (see docs/multi-gpu.md)")
        if options.num_processes is None and options.config_file is None:
            problems.append("--num-machines needs --num-processes (the total over all machines)")
    if options.machine_rank is not None and options.machine_rank >= machines:
        problems.append(f"--machine-rank {options.machine_rank} must be below --num-machines {machines}")
    if options.num_processes is not None and options.num_processes % machines:
        problems.append(
            f"--num-processes {options.num_processes} is the total over all machines: it must be a multiple of "
            f"--num-machines {machines}"
        )
    if options.config_file is not None and not options.config_file.is_file():
        problems.append(f"--accelerate-config {options.config_file}: no such file")
    if problems:
        raise UsageError("; ".join(problems))
    if options.config_file is not None:
        _check_config_backend(options.config_file)


def _check_config_backend(path: Path) -> None:
    """DeepSpeed selected in an accelerate config without the package installed: say so before launching."""
    import importlib.util

    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(str(path))
    except Exception as exc:
        raise UsageError(f"--accelerate-config {path}: not a readable accelerate config ({exc})") from None
    if str(config.distributed_type).endswith("DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("deepspeed", f"{path} (DeepSpeed)")  # CUDA only; or MULTI_GPU / FSDP


def launch_argv(options: LaunchOptions, sdtool_args: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `python -m sdtool <sdtool_args>` on every process."""
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if options.config_file is not None:
        argv += ["--config_file", str(options.config_file)]
    else:
        # No config: say everything, so accelerate neither guesses nor warns. `--multi_gpu` is accelerate's
        # torchrun launcher; on a machine without GPUs each rank then runs on CPU with gloo (distributed.py).
        # (`--cpu` would use accelerate's MPI launcher instead, which needs mpirun.)
        processes = options.num_processes or 1
        if processes > 1:
            argv.append("--multi_gpu")
        argv += ["--num_processes", str(processes), "--num_machines", str(options.num_machines or 1)]
        argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the training config's own setting wins
    if options.config_file is not None and options.num_processes is not None:
        argv += ["--num_processes", str(options.num_processes)]
    if options.config_file is not None and options.num_machines is not None:
        argv += ["--num_machines", str(options.num_machines)]
    if options.machine_rank is not None:
        argv += ["--machine_rank", str(options.machine_rank)]
    if options.main_process_ip is not None:
        argv += ["--main_process_ip", options.main_process_ip]
    if options.main_process_port is not None:
        argv += ["--main_process_port", str(options.main_process_port)]
    elif (options.num_machines or 1) == 1 and options.config_file is None:
        argv += ["--main_process_port", "0"]  # a free port: two runs on one machine must not collide on 29500
    return [*argv, "-m", "sdtool", *sdtool_args]


def run_launch(options: LaunchOptions, sdtool_args: list[str], env: dict[str, str] | None = None) -> int:
    """Check the options, run `accelerate launch` (with `env` added to the environment), return its exit code."""
    from sdtool.console import debug, info

    check_launch(options)
    argv = launch_argv(options, sdtool_args)
    info(f"launching: accelerate launch {' '.join(argv[3:])}")
    debug(" ".join(argv))
    return subprocess.run(argv, check=False, env={**os.environ, **(env or {})}).returncode
