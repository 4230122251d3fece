"""Models from the Hugging Face hub, offline first: the local cache is asked before the network, and a model that
must be downloaded from a hub that cannot be reached fails within seconds with one line saying what to do.

`local_model(repo_id, …)` returns a local folder (the cached snapshot) holding what the caller needs; callers load
from that folder, so transformers and diffusers never touch the network themselves (their per-file retries are
what made an offline `sdtool caption` spend minutes before failing). Downloads go through huggingface_hub's
`snapshot_download` with the exact files chosen here: the configs and tokenizer files of the folders asked for, and
one set of weights per folder (safetensors over pickles, no fp16/EMA variants, no other frameworks' weights).

`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) never touches the network. `HF_ENDPOINT`, `HF_HOME` and
`HF_HUB_CACHE` are honoured, as huggingface_hub honours them.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from sdtool.errors import ModelError

# A hub repo id: owner/name (what huggingface_hub accepts; no leading dot, no path separators beyond the one).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Weights for other frameworks or runtimes that sdtool never loads from a transformers/diffusers folder.
_FOREIGN_SUFFIXES = (".h5", ".msgpack", ".ot", ".onnx", ".onnx_data", ".tflite", ".mlmodel", ".gguf", ".ckpt", ".pt")
REACH_TIMEOUT = 5.0  # seconds to wait for the hub to answer a connection before calling it unreachable


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path."""
    return bool(_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): never use the network (huggingface_hub's own rule)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def cache_folder() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or str(constants.ENDPOINT)


def local_model(
    repo_id: str,
    *,
    what: str,
    folders: dict[str, bool] | None = None,
    files: Sequence[str] = (),
    local_hint: str = "pass --model DIR with a local copy",
) -> Path:
    """The local snapshot of `repo_id` holding what is asked for, from the cache or else downloaded.

    `folders` maps each folder of the repo ("" for its top level) to whether its weights are needed (its configs and
    tokenizer files always are); `files` names exact files instead. `what` names the model in messages
    ("the captioning model"), `local_hint` how to give a local copy instead. Raises ModelError, one line with the
    fix, when it is not cached and cannot be fetched.
    """
    folders = folders or {}
    cached = cached_snapshot(repo_id, folders, files)
    if cached is not None:
        return cached
    cache = cache_folder()
    fix = (
        f"{local_hint}, or run this command once where there is internet and copy {cache} from there, or point "
        "HF_HOME at such a copy"
    )
    if offline():
        raise ModelError(
            f"{what} {repo_id} is not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE=1 forbids downloading it",
            hint=f"{fix}; or unset HF_HUB_OFFLINE",
        )
    if not _reachable(endpoint()):
        raise ModelError(
            f"{what} {repo_id} is not in the Hugging Face cache ({cache}), and the hub ({endpoint()}) cannot be "
            "reached",
            hint=f"{fix}; HF_HUB_OFFLINE=1 skips the hub",
        )
    return _download(repo_id, what, folders, files, fix, local_hint)


def cached_snapshot(repo_id: str, folders: dict[str, bool] | None = None, files: Sequence[str] = ()) -> Path | None:
    """The cached snapshot folder of `repo_id` (its main revision) when it holds everything asked for; no network.

    The snapshot is found through one file every copy has (the first of `files`; else `model_index.json` for a
    diffusers repo's top level, `config.json` for another repo's, or the first folder's `config.json`), then checked
    for the rest.
    """
    from huggingface_hub import try_to_load_from_cache

    folders = folders or {}
    if files:
        anchor = files[0]
    elif "" in folders:
        anchor = "model_index.json" if len(folders) > 1 else "config.json"
    else:
        anchor = f"{next(iter(folders), '')}/config.json".lstrip("/")
    found = try_to_load_from_cache(repo_id, anchor)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parents[len(Path(anchor).parts) - 1]
    return snapshot if _complete(snapshot, folders, files) else None


def _complete(snapshot: Path, folders: dict[str, bool], files: Sequence[str]) -> bool:
    """Every named file is there; every asked-for folder has its small files and, where needed, weights."""
    if any(not (snapshot / name).is_file() for name in files):
        return False
    for folder, weights in folders.items():
        here = snapshot / folder if folder else snapshot
        present = [p for p in here.iterdir() if p.is_file()] if here.is_dir() else []
        if not any(not _is_weight(p.name) for p in present):
            return False
        if weights and not any(_is_weight(p.name) and _is_plain(p.name) for p in present):
            return False
    return True


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_FOREIGN_SUFFIXES)


def _is_plain(name: str) -> bool:
    """Not a variant: `model.safetensors`, `diffusion_pytorch_model-00001-of-00002.safetensors`, not `….fp16.…`."""
    return name.endswith(_WEIGHT_SUFFIXES) and name.count(".") == 1


def choose_files(repo_files: Iterable[str], folders: dict[str, bool]) -> list[str]:
    """The files of a repo to download for `folders`: small files always, one set of weights where needed."""
    chosen = []
    by_folder: dict[str, list[str]] = {}
    for name in repo_files:
        folder, _, base = name.rpartition("/")
        if folder in folders:
            by_folder.setdefault(folder, []).append(base)
    for folder, weights in folders.items():
        names = by_folder.get(folder, [])
        prefix = f"{folder}/" if folder else ""
        chosen += [prefix + n for n in names if not _is_weight(n) and not n.startswith(".")]
        if weights:
            plain = [n for n in names if _is_plain(n)]
            preferred = [n for n in plain if n.endswith(".safetensors")] or [n for n in plain if n.endswith(".bin")]
            chosen += [prefix + n for n in preferred]
    return chosen


def _download(
    repo_id: str, what: str, folders: dict[str, bool], files: Sequence[str], fix: str, local_hint: str
) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from sdtool.console import info, live_progress

    try:
        listing = {
            entry.path: getattr(entry, "size", 0) or 0
            for entry in HfApi().list_repo_tree(repo_id, recursive=True)
            if hasattr(entry, "size")
        }
    except Exception as exc:
        raise ModelError(f"{what} {repo_id}: the hub cannot list it ({_short(exc)})", hint=fix) from None
    wanted = list(files) if files else choose_files(listing, folders)
    missing = [name for name in files if name not in listing]
    if missing or not wanted:
        raise ModelError(
            f"{what} {repo_id} has no {', '.join(missing) or 'usable files'} on the hub",
            hint=f"check the repo id, or {local_hint}",
        )
    size = sum(listing.get(name, 0) for name in wanted)
    info(f"downloading {what} {repo_id} ({len(wanted)} files, {size / 2**30:.2f} GiB) into {cache_folder()}")
    if not live_progress():
        disable_progress_bars()  # bars redrawn with carriage returns only clutter a log
    try:
        return Path(snapshot_download(repo_id, allow_patterns=wanted))
    except Exception as exc:
        raise ModelError(
            f"{what} {repo_id}: the download failed ({_short(exc)})", hint=f"run it again, or {fix}"
        ) from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _reachable(url: str, timeout: float = REACH_TIMEOUT) -> bool:
    """Whether the hub's host accepts a connection within `timeout` seconds (name lookup included).

    With a proxy configured the direct connection says nothing, so the hub is taken as reachable and
    huggingface_hub's own timeouts apply.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread, because a name lookup on a machine without network can hang longer than any socket timeout.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])
