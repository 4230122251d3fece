"""Text-encoder outputs computed once (`cache_text_encoder_outputs`, kohya's sdxl_train option), in memory or on disk.

Content-addressed: an entry's name is a digest of everything its tensors depend on — the caption exactly as the
text encoders see it, `max_token_length`, `clip_skip`, the model family and the text encoders' weights — so an
entry is either right or absent: nothing can go stale in place, and a changed caption or model looks for another
file. Captions shared by several images share one entry.

On disk (`cache_text_encoder_outputs_to_disk`, `sdtool cache --text-encoder-outputs`): `<META stem>.text/` beside
the metadata file, one `<digest[:32]>.safetensors` per caption with float32 `hidden` (2 + 75n, D) and, for families
with a pooled embedding (SDXL), `pooled` (P); the safetensors metadata records the caption and settings for people.
An entry that cannot be read counts as missing and is encoded again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY_VERSION = "1"


def text_cache_dir(metadata_path: str | Path) -> Path:
    """Where the text-encoder outputs of a metadata file's captions live: `<META stem>.text/` beside it."""
    path = Path(metadata_path).absolute()
    return path.parent / f"{path.stem}.text"


def text_encoders_fingerprint(text_encoders: Sequence[Any]) -> str:
    """sha256 over every text-encoder tensor (names, dtypes and bytes, in order): outputs depend on all of them."""
    import torch

    digest = hashlib.sha256()
    for encoder in text_encoders:
        for name, tensor in sorted(encoder.state_dict().items()):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return "te-sha256:" + digest.hexdigest()[:32]


@dataclass(frozen=True)
class TextSettings:
    """Everything besides the caption that a text-encoder output depends on."""

    family: str
    encoders: str  # text_encoders_fingerprint
    max_token_length: int | None
    clip_skip: int | None

    def key(self, text: str) -> str:
        """The content address of one caption's outputs."""
        record = {"v": ENTRY_VERSION, "text": text, **self.__dict__}
        return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def entry_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.safetensors"


def read_entry(path: Path) -> dict[str, Any] | None:
    """The tensors of an entry ({"hidden", "pooled"?}), or None when it is absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError):
        return None
    hidden = tensors.get("hidden")
    if hidden is None or hidden.ndim != 2 or not bool(hidden.isfinite().all()):
        return None
    return tensors


def write_entry(path: Path, hidden: Any, pooled: Any, text: str, settings: TextSettings) -> Path:
    """Write one caption's outputs atomically (float32, contiguous)."""
    from safetensors.torch import save

    from sdtool.fsutil import atomic_write_bytes

    tensors = {"hidden": hidden.detach().to("cpu").float().contiguous()}
    if pooled is not None:
        tensors["pooled"] = pooled.detach().to("cpu").float().contiguous()
    record = {"sdtool_text_outputs": ENTRY_VERSION, "text": text, **{k: str(v) for k, v in settings.__dict__.items()}}
    return atomic_write_bytes(path, save(tensors, metadata=record))


def encode_missing(
    texts: Iterable[str],
    family: Any,
    tokenizers: Sequence[Any],
    text_encoders: Sequence[Any],
    settings: TextSettings,
    *,
    store: dict[str, dict[str, Any]] | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    advance: Any = None,
) -> int:
    """Encode every text whose outputs are neither in `store` (when given) nor on disk in `cache_dir` (when given);
    put them in `store` and/or write them to `cache_dir`. Returns how many texts were encoded."""
    import torch

    todo: list[str] = []
    for text in dict.fromkeys(texts):  # each caption once, in a stable order
        key = settings.key(text)
        if store is not None and key in store:
            continue
        found = read_entry(entry_path(cache_dir, key)) if cache_dir is not None else None
        if found is not None:
            if store is not None:
                store[key] = found
            if advance is not None:
                advance(1)
            continue
        todo.append(text)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        with torch.no_grad():
            conditioning = family.encode_prompts(
                tokenizers, text_encoders, batch, settings.max_token_length, settings.clip_skip
            )
        for row, text in enumerate(batch):
            hidden = conditioning.hidden[row].float().cpu()
            pooled = conditioning.pooled[row].float().cpu() if conditioning.pooled is not None else None
            key = settings.key(text)
            if cache_dir is not None:
                write_entry(entry_path(cache_dir, key), hidden, pooled, text, settings)
            if store is not None:
                store[key] = {"hidden": hidden} | ({"pooled": pooled} if pooled is not None else {})
        if advance is not None:
            advance(len(batch))
    return len(todo)


def missing_texts(texts: Iterable[str], settings: TextSettings, cache_dir: Path) -> list[str]:
    """The texts whose outputs are not (readably) on disk in `cache_dir` (for `cache --status`)."""
    return [t for t in dict.fromkeys(texts) if read_entry(entry_path(cache_dir, settings.key(t))) is None]


@dataclass
class TextCacheSummary:
    """What `sdtool cache --text-encoder-outputs` found and did."""

    captions: int = 0
    encoded: int = 0
    missing: int = 0


def metadata_texts(metadata_path: str | Path, image_dir: str | Path | None = None) -> list[tuple[Path, str]]:
    """(image, caption) of every entry, the caption as training sees it with the default caption options (caption
    and tags joined with ","; no prefix, suffix or keep_tokens). Training with other options encodes its own."""
    from sdtool.captions import CaptionRules, assemble_caption, fixed_caption
    from sdtool.errors import InputError
    from sdtool.metadata import ImageResolver, read_metadata

    metadata_path = Path(metadata_path)
    resolver = ImageResolver(Path(image_dir) if image_dir is not None else metadata_path.absolute().parent)
    rules = CaptionRules()
    out = []
    for key, entry in read_metadata(metadata_path).items():
        try:
            image = resolver.resolve(key)
        except InputError:  # an unusable key is the latent cache's to report
            continue
        text = assemble_caption(entry.get("caption"), entry.get("tags"), rules.caption_separator)
        out.append((image, fixed_caption(text, rules)))
    return out


def run_text_cache(
    metadata_path: str | Path,
    *,
    model: str,
    image_dir: str | Path | None,
    max_token_length: int | None,
    clip_skip: int | None,
    device: str,
    status_only: bool,
) -> tuple[TextCacheSummary, list[tuple[Path, str, bool]]]:
    """Encode (or, with `status_only`, look for) the text-encoder outputs of every caption of a metadata file in
    `<META stem>.text/`; returns the summary and (image, caption, ok) per entry."""
    from sdtool.console import progress_bar
    from sdtool.models.loading import load_model
    from sdtool.runtime import resolve_device

    pairs = metadata_texts(metadata_path, image_dir)
    loaded = load_model(model, components=("text_encoder", "tokenizer"))
    encoders = [te.to(resolve_device(device)).eval() for te in loaded.text_encoders]
    settings = TextSettings(loaded.family.name, text_encoders_fingerprint(encoders), max_token_length, clip_skip)
    folder = text_cache_dir(metadata_path)
    summary = TextCacheSummary(captions=len({text for _, text in pairs}))
    if not status_only:
        with progress_bar("text-encoder outputs", summary.captions, unit="captions") as advance:
            summary.encoded = encode_missing(
                (t for _, t in pairs),
                loaded.family,
                loaded.tokenizers,
                encoders,
                settings,
                cache_dir=folder,
                advance=advance,
            )
    missing = set(missing_texts((t for _, t in pairs), settings, folder))
    summary.missing = len(missing)
    return summary, [(image, text, text not in missing) for image, text in pairs]
