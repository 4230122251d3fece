"""Sample prompt files (kohya's formats, so users' files work unchanged) and the sampler names.

* `.txt` — one prompt per line; blank lines and lines starting with `#` (after leading spaces) are skipped. Options
  follow the prompt, each introduced by " --": `--n <negative prompt>`, `--w <width>`, `--h <height>`, `--d <seed>`,
  `--l <CFG scale>`, `--s <steps>`, `--ss <sampler>`; names are case-insensitive. Any other option is an error that
  names the file and line (kohya silently ignores unknown ones; its `--g`, `--cn`, `--ctr`, `--rcfg`, `--fs`, `--f`
  belong to other model families or ControlNet and are refused rather than ignored).
* `.toml` — kohya's layout, a `[prompt]` table of defaults with `[[prompt.subset]]` entries (an entry's keys win),
  or a plain `[[prompt]]` array of tables.
* `.json` — a list whose items are objects or `.txt`-style lines.

Keys of the table/object forms are kohya's: `prompt`, `negative_prompt`, `width`, `height`, `seed`, `scale`,
`sample_steps`, `sample_sampler`. Unknown keys are errors naming the file and entry.

Behaviour (documented differences from kohya in brackets):

* Width and height are rounded down to a multiple of 8, at least 64 (as kohya), and at most 4096 [kohya: no limit, so
  a typo such as `--w 51200` only fails, out of memory, at the first sample hours into a run]. Steps must be
  1–1000 [kohya clamps].
* A prompt without a seed gets seed = its index in the file [kohya: a random seed], so every sampling point renders
  the same noise and samples stay comparable across a run and reproducible across runs.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.errors import InputError, UsageError

# kohya's `--sample_sampler` names → (diffusers scheduler class, extra config). `ddpm` is left out, as in kohya.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}


DEFAULT_SCALE = 7.5  # kohya's default CFG scale


MAX_STEPS = 1000


MAX_SIDE = 4096  # 8× SD's native size; the U-Net's attention at 512×512 latents would not fit any GPU anyway


# kohya options that parse but mean nothing for SD 1.x/2.x here: refused with a reason instead of ignored.
_FOREIGN_OPTIONS = {
    "g": "guidance scale of distilled models (FLUX)",
    "cn": "a ControlNet image",
    "ctr": "CFG truncation (Lumina)",
    "rcfg": "CFG renormalisation (Lumina)",
    "fs": "flow shift (flow-matching models)",
    "f": "frame count (video models)",
}


_OPTION_KEYS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps"}


_OPTION_KEYS["ss"] = "sample_sampler"


_DICT_KEYS = {"prompt", *_OPTION_KEYS.values()}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample to render; None means "use generate_samples' default"."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    source: str = ""  # where it came from ("prompts.txt:3"), for messages


def sampler_names() -> list[str]:
    """The sampler names `--ss` / `sample_sampler` accept (kohya's list)."""
    return list(SAMPLERS)


def check_sampler(name: str) -> str:
    """Return the normalised sampler name or raise UsageError listing the valid ones."""
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}", hint=f"use one of {', '.join(SAMPLERS)}")
    return key


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a kohya sample-prompt file (.txt, .toml or .json); errors name the file and line or entry."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise InputError(path, "sample prompts must be a .txt, .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(path, "sample prompt file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read sample prompts: {exc}") from exc

    if suffix == ".txt":
        prompts = [
            parse_prompt_line(line, source=f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
    elif suffix == ".toml":
        prompts = _prompts_from_toml(path, text)
    else:
        prompts = _prompts_from_json(path, text)
    if not prompts:
        raise InputError(path, "no sample prompts in the file")
    return prompts


def parse_prompt_line(line: str, source: str = "<line>") -> SamplePrompt:
    """Parse one kohya prompt line: `prompt --n neg --w 512 --h 512 --d 1 --l 7.5 --s 30 --ss euler_a`."""
    pieces = line.strip().split(" --")
    fields: dict[str, Any] = {"prompt": pieces[0].strip()}
    for piece in pieces[1:]:
        piece = piece.strip()
        if not piece:  # a stray " --" (newer kohya skips it too)
            continue
        name, _, value = piece.partition(" ")
        name, value = name.lower(), value.strip()
        if name in _FOREIGN_OPTIONS:
            raise UsageError(f"{source}: option --{name} ({_FOREIGN_OPTIONS[name]}) does not apply to SD 1.x/2.x")
        if name not in _OPTION_KEYS:
            raise UsageError(
                f"{source}: unknown option --{name}", hint="options are --n, --w, --h, --d, --l, --s and --ss"
            )
        if not value:
            raise UsageError(f"{source}: option --{name} needs a value")
        key = _OPTION_KEYS[name]
        if key in fields:
            raise UsageError(f"{source}: option --{name} is given twice")
        fields[key] = _convert_text_value(key, value, f"{source}: --{name}")
    return _make_prompt(fields, source)


def _convert_text_value(key: str, value: str, where: str) -> Any:
    if key in ("negative_prompt", "sample_sampler"):
        return value
    if key == "scale":
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", value):
            raise UsageError(f"{where}: {value!r} is not a number")
        return float(value)
    if not re.fullmatch(r"\d+", value):
        raise UsageError(f"{where}: {value!r} is not a whole number")
    return int(value)


def _prompts_from_toml(path: Path, text: str) -> list[SamplePrompt]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(path, f"invalid TOML: {exc}") from exc
    table = data.get("prompt")
    if isinstance(table, list):  # [[prompt]] tables
        entries = [(f"{path}: [[prompt]] #{i + 1}", entry) for i, entry in enumerate(table)]
    elif isinstance(table, dict):  # kohya: [prompt] defaults + [[prompt.subset]]
        subsets = table.get("subset")
        if not isinstance(subsets, list):
            raise InputError(path, "[prompt] needs [[prompt.subset]] entries (kohya's layout)")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        entries = [(f"{path}: [[prompt.subset]] #{i + 1}", {**defaults, **entry}) for i, entry in enumerate(subsets)]
    else:
        raise InputError(path, "expected a [prompt] table with [[prompt.subset]] entries, or [[prompt]] tables")
    other = sorted(set(data) - {"prompt"})
    if other:
        raise InputError(path, f"unknown top-level key(s) {', '.join(other)}; sample prompts go under 'prompt'")
    return [_prompt_from_dict(entry, source) for source, entry in entries]


def _prompts_from_json(path: Path, text: str) -> list[SamplePrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise InputError(path, "expected a JSON list of prompt objects or prompt lines")
    prompts = []
    for i, item in enumerate(data):
        source = f"{path}: item {i}"
        if isinstance(item, str):
            prompts.append(parse_prompt_line(item, source))
        else:
            prompts.append(_prompt_from_dict(item, source))
    return prompts


def _prompt_from_dict(entry: Any, source: str) -> SamplePrompt:
    if not isinstance(entry, dict):
        raise UsageError(f"{source}: expected an object with a 'prompt' key, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _DICT_KEYS)
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(unknown)}", hint=f"keys are {', '.join(_DICT_KEYS)}")
    for key, value in entry.items():
        if key in ("prompt", "negative_prompt", "sample_sampler"):
            ok = isinstance(value, str)
        elif key == "scale":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise UsageError(f"{source}: {key} has the wrong type ({value!r})")
    return _make_prompt(dict(entry), source)


def _make_prompt(fields: dict[str, Any], source: str) -> SamplePrompt:
    """Validate resolved fields (shared by all formats) and build the SamplePrompt."""
    if "prompt" not in fields:
        raise UsageError(f"{source}: missing 'prompt'")
    for key in ("width", "height"):
        if key in fields and not 8 <= fields[key] <= MAX_SIDE:
            raise UsageError(f"{source}: {key} must be between 8 and {MAX_SIDE}, not {fields[key]}")
    if "sample_steps" in fields and not 1 <= fields["sample_steps"] <= MAX_STEPS:
        raise UsageError(f"{source}: steps must be between 1 and {MAX_STEPS}, not {fields['sample_steps']}")
    if "seed" in fields and not 0 <= fields["seed"] < 2**64:
        raise UsageError(f"{source}: seed must be between 0 and 2**64-1")
    if "scale" in fields and not math.isfinite(fields["scale"]):
        raise UsageError(f"{source}: scale must be a finite number")
    sampler = fields.get("sample_sampler")
    if sampler is not None:
        try:
            sampler = check_sampler(sampler)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc.message}", hint=exc.hint) from exc
    return SamplePrompt(
        prompt=fields["prompt"],
        negative_prompt=fields.get("negative_prompt", ""),
        width=fields.get("width"),
        height=fields.get("height"),
        seed=fields.get("seed"),
        scale=float(fields["scale"]) if "scale" in fields else None,
        steps=fields.get("sample_steps"),
        sampler=sampler,
        source=source,
    )
