"""Conventions every command keeps (CONTRACT §A, §B), checked over the Typer app itself: a command added later is
held to them without touching this file (apart from its arguments' kinds, which sdtool/cli/options.py declares).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main

from sdtool.cli import app
from sdtool.cli.options import DEFAULT_DEVICE, INPUT_KINDS, OUTPUT_ARGS

ROOT = typer.main.get_command(app)
COMMANDS = sorted(ROOT.commands)  # type: ignore[attr-defined]
# Commands that write nothing a rerun could find (so they have no --overwrite).
WRITES_NOTHING = {"doctor"}
# Required options that are not input paths, and a valid value for each (a new one must be added here).
REQUIRED_OPTION_VALUES = {"--output": "out.json"}


def command(name: str):
    return ROOT.commands[name]  # type: ignore[attr-defined]


def arguments(name: str) -> list[Any]:
    return [p for p in command(name).params if p.param_type_name == "argument"]


def options(name: str) -> list[Any]:
    return [p for p in command(name).params if p.param_type_name == "option" and p.name != "help"]


def with_required_options(name: str, tmp_path) -> list[str]:
    extra = []
    for opt in options(name):
        if opt.required:
            flag = next(o for o in opt.opts if o.startswith("--"))
            assert flag in REQUIRED_OPTION_VALUES, f"{name}: add a valid value for {flag} to REQUIRED_OPTION_VALUES"
            extra += [flag, str(tmp_path / REQUIRED_OPTION_VALUES[flag])]
    return extra


def test_the_app_has_commands():
    assert {"caption", "tag", "bucket", "cache", "train", "convert", "doctor", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_argument_says_what_it_takes(name):
    for arg in arguments(name):
        assert arg.metavar in INPUT_KINDS or arg.metavar in OUTPUT_ARGS, (
            f"{name} {arg.name}: give it a metavar from INPUT_KINDS / OUTPUT_ARGS in sdtool/cli/options.py"
        )


@pytest.mark.parametrize("name", [n for n in COMMANDS if any(a.required for a in arguments(n))])
def test_missing_arguments_print_a_short_usage_and_the_error_on_stderr(cli, name):
    result = cli(name)
    assert result.exit_code == 2
    assert result.stdout == ""  # never the help on stdout
    assert result.stderr.startswith(f"Usage: sdtool {name} ")
    assert "Missing argument" in result.stderr
    assert len(result.stderr.splitlines()) <= 6  # short: usage, the hint, the error


def _inputs(name: str) -> list[tuple[int, str]]:
    return [(i, INPUT_KINDS[a.metavar]) for i, a in enumerate(arguments(name)) if a.metavar in INPUT_KINDS]


def _argv(name: str, tmp_path, position: int, value: object) -> list[str]:
    """Every argument filled with something valid-looking, except the one at `position`."""
    argv = [name]
    for i in range(len(arguments(name))):
        argv.append(str(value) if i == position else str(tmp_path / f"arg{i}"))
    return argv + with_required_options(name, tmp_path)


CASES = [(name, position, kind) for name in COMMANDS for position, kind in _inputs(name)]


@pytest.mark.parametrize(("name", "position", "kind"), CASES)
def test_a_missing_input_is_a_usage_error_naming_what_is_expected(cli, tmp_path, name, position, kind):
    missing = tmp_path / "no-such-input"
    result = cli(*_argv(name, tmp_path, position, missing))
    assert result.exit_code == 2, result.output
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "expected" in result.stderr  # names the right input
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "position", "kind"), CASES)
def test_an_empty_folder_is_a_usage_error_with_a_hint(cli, tmp_path, name, position, kind):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(*_argv(name, tmp_path, position, empty))
    assert result.exit_code == 2, result.output
    assert str(empty) in result.stderr
    hints = {
        "image folders": "no images in",
        "metadata file": "not the metadata JSON",
        "config file": "not a training config",
        "model": "not a diffusers model",
        "training output": "not the output folder of a training run",
    }
    assert hints[kind] in result.stderr, result.stderr


@pytest.mark.parametrize(("name", "position", "kind"), CASES)
def test_a_path_of_the_wrong_kind_is_a_usage_error_naming_the_right_input(cli, tmp_path, name, position, kind):
    # A file where a folder is expected; for file inputs, a folder (cache DIR instead of its metadata JSON).
    if kind == "image folders":
        wrong = tmp_path / "meta.json"
        wrong.write_text("{}")
        expected = "not an image or a folder of images"
    else:
        wrong = tmp_path / "data"
        wrong.mkdir()
        (wrong / "meta.json").write_text("{}")
        (wrong / "config.toml").write_text("")
        expected = {
            "metadata file": "it holds meta.json",
            "config file": "it holds config.toml",
            "model": "expected a .safetensors/.ckpt file, a diffusers folder",
            "training output": "not the output folder of a training run",
        }[kind]
    result = cli(*_argv(name, tmp_path, position, wrong))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("flag", ["-v", "--verbose", "-q", "--quiet"])
def test_global_verbosity_flags_work_after_the_command_name(cli, name, flag):
    result = cli(name, flag, "--help")
    assert result.exit_code == 0, result.output
    assert flag in result.stdout


def test_quiet_after_the_command_silences_it(cli):
    loud = cli("doctor")
    quiet = cli("doctor", "-q")
    assert "sdtool doctor" in loud.stderr and "sdtool doctor" not in quiet.stderr
    assert cli("-q", "doctor", "-v").exit_code == 2  # still exclusive, wherever they are given


@pytest.mark.parametrize("name", COMMANDS)
def test_boolean_options_are_flags_that_default_to_off(cli, name):
    for opt in options(name):
        if opt.is_flag:
            assert opt.default is False, f"{name} {opt.opts}: a flag is off unless given"
            assert not opt.secondary_opts, f"{name} {opt.opts}: no --no- form"
    text = cli(name, "--help", env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in text and "BOOLEAN" not in text


@pytest.mark.parametrize("name", [n for n in COMMANDS if n not in WRITES_NOTHING])
def test_commands_that_write_outputs_have_overwrite(name):
    overwrite = [o for o in options(name) if "--overwrite" in o.opts]
    assert overwrite and overwrite[0].is_flag


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_shows_its_default(cli, name):
    text = " ".join(cli(name, "--help", env={"COLUMNS": "2000"}).stdout.split())
    for opt in options(name):
        if opt.is_flag or opt.required:
            continue  # a flag is off unless given (checked above); a required option has no default
        flag = max(opt.opts, key=len)
        help_text = opt.help or ""
        shown = opt.show_default is not False and opt.default is not None and opt.default != ""
        assert shown or re.search(r"\bdefault\b", help_text), f"{name} {flag}: say its default in the help"
        assert flag in text


SHARED = ["--device", "--workers", "--recursive", "--overwrite", "--strict", "--caption-extension", "--tags-extension"]


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_has_one_name_and_one_default(flag):
    seen = {}
    for name in COMMANDS:
        for opt in options(name):
            if flag in opt.opts:
                seen[name] = (tuple(sorted(opt.opts)), opt.default, opt.is_flag)
    assert len(set(seen.values())) <= 1, seen


def test_device_defaults_to_auto_everywhere():
    defaults = {name: o.default for name in COMMANDS for o in options(name) if "--device" in o.opts}
    assert defaults and set(defaults.values()) == {DEFAULT_DEVICE} == {"auto"}, defaults


def test_tags_extension_has_one_name_on_tag_and_bucket():
    for name in ("tag", "bucket"):
        names = {f for o in options(name) for f in o.opts}
        assert "--tags-extension" in names, name
    assert "--caption-extension" not in {f for o in options("tag") for f in o.opts}


@pytest.mark.parametrize("name", COMMANDS)
def test_json_help_says_what_it_prints(name):
    for opt in options(name):
        if "--json" in opt.opts:
            assert re.search(r"\{.*\}|object", opt.help or ""), f"{name} --json: say what it prints"
            assert "stdout" in (opt.help or "")


def test_doctor_json_help_names_its_object(cli):
    text = " ".join(cli("doctor", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert '{"checks": [{"name", "status", "detail"}' in text
