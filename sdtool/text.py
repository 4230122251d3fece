"""Prompt tokenization and encoding for SD v1/v2 (CONTRACT §G), bit-identical to kohya's long-prompt scheme.

`max_token_length` 75 (None), 150 or 225: the prompt is tokenized to `max + 2` ids and cut into 77-id chunks
`[BOS] + ids[i:i+75] + [last id]` for i = 1, 76, 151. Each chunk is encoded on its own (positions restart, CLIP's
causal mask only); `clip_skip=k` takes `hidden_states[-k]` and applies the final layer norm. The states are put
back together as `2 + 75n` positions: chunk 0's BOS, each chunk's 75 inner states, the last chunk's final state.

Before tokenizing, every prompt (training caption or sample prompt) is cleaned the way CLIP's and OpenCLIP's own
tokenizers clean the text the models were trained on (`clean_prompt`): the transformers 5 tokenizer only applies
NFC, whitespace collapsing and lower case, so `&amp;` or mojibake would otherwise become other tokens.
"""

from __future__ import annotations

import html
import importlib
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

from sdtool.console import warn
from sdtool.errors import UsageError

CHUNK = 75
ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


_WHITESPACE = re.compile(r"\s+")
_fix_text: Any = None


def clean_prompt(text: str) -> str:
    """CLIP's `basic_clean` + `whitespace_clean`: ftfy's `fix_text` (when ftfy is installed), HTML entities
    unescaped twice, runs of whitespace collapsed to one space, ends stripped.

    Written out here because transformers 5 dropped this step from `CLIPTokenizer`; openai/CLIP's and
    open_clip's `simple_tokenizer.py` (SD1's and SD2's text encoders) do exactly this before BPE, and kohya's
    trainers get it from transformers 4 with ftfy. Lower-casing is left to the tokenizer, which does it.
    """
    global _fix_text
    if _fix_text is None:
        try:
            _fix_text = importlib.import_module("ftfy").fix_text
        except ImportError:
            _fix_text = False
    if _fix_text:
        text = _fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def num_chunks(max_token_length: int | None) -> int:
    """How many 77-id chunks a prompt of `max_token_length` tokens is cut into."""
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise UsageError(f"max_token_length must be 75, 150 or 225, not {max_token_length!r}")
    return (max_token_length or CHUNK) // CHUNK


class TruncationReporter:
    """Warns once per length class (76–150, 151–225, … tokens) that prompts were cut, never silently."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def report(self, prompt: str, n_tokens: int, max_token_length: int | None) -> None:
        """`n_tokens` counts the prompt's tokens without BOS/EOS."""
        limit = max_token_length or CHUNK
        if n_tokens <= limit:
            return
        key = (limit, math.ceil(n_tokens / CHUNK))
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        lo, hi = (key[1] - 1) * CHUNK + 1, key[1] * CHUNK
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        warn(
            f"prompts of {lo}-{hi} tokens are cut to max_token_length {limit} "
            f"(first: {n_tokens} tokens, {shown!r}); raise max_token_length or shorten them"
        )


default_reporter = TruncationReporter()


def tokenize_chunks(
    tokenizer: Any, prompts: Sequence[str], max_token_length: int | None = None
) -> tuple[Any, list[int]]:
    """Token ids as a (B, n, 77) LongTensor, and each prompt's own token count (for truncation reports)."""
    import torch

    n = num_chunks(max_token_length)
    max_length = n * CHUNK + 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # One untruncated call gives both the ids and the true length; truncating + padding it by hand is exactly
    # what `padding="max_length", truncation=True` does for CLIP (content cut to max-2, then BOS/EOS/PAD).
    cleaned = [clean_prompt(prompt) for prompt in prompts]
    encoded = tokenizer(cleaned, add_special_tokens=False, truncation=False, padding=False)["input_ids"]
    rows: list[list[list[int]]] = []
    lengths: list[int] = []
    for ids in encoded:
        lengths.append(len(ids))
        content = ids[: max_length - 2]
        full = [bos, *content, eos] + [pad] * (max_length - 2 - len(content))
        rows.append(_chunk(full, n, eos, pad))
    return torch.tensor(rows, dtype=torch.long), lengths


def _chunk(full: list[int], n: int, eos: int, pad: int) -> list[list[int]]:
    if n == 1:
        return [full]
    chunks = []
    for i in range(1, len(full) - CHUNK, CHUNK):
        chunk = [full[0], *full[i : i + CHUNK], full[-1]]
        if pad != eos:  # OpenCLIP's "!" padding: an EOS ends a full chunk and starts an empty one
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


def final_layer_norm(text_encoder: Any) -> Any:
    """The text encoder's final LayerNorm (transformers 5 keeps it on CLIPTextModel; 4.x under `.text_model`)."""
    for owner in (text_encoder, getattr(text_encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if norm is not None:
            return norm
    raise UsageError(f"{type(text_encoder).__name__} has no final_layer_norm; clip_skip needs a CLIP text encoder")


def encode_chunks(text_encoder: Any, ids: Any, clip_skip: int | None = None) -> Any:
    """Encode (B, n, 77) ids chunk by chunk and reassemble them to (B, 2 + 75n, D) hidden states."""
    b, n, length = ids.shape
    flat = ids.reshape(b * n, length).to(text_encoder.device)
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(flat).last_hidden_state
    else:
        out = text_encoder(flat, output_hidden_states=True)
        states = final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return reassemble_chunks(states, b, n)


def reassemble_chunks(states: Any, b: int, n: int) -> Any:
    """(B·n, 77, D) per-chunk states → (B, 2 + 75n, D): chunk 0's BOS, each chunk's 75 inner states, the last
    chunk's final state (one chunk stays as it is)."""
    length = states.shape[1]
    states = states.reshape(b, n * length, states.shape[-1])
    if n == 1:
        return states
    import torch

    inner = [states[:, k * length + 1 : k * length + length - 1] for k in range(n)]
    return torch.cat([states[:, :1], *inner, states[:, -1:]], dim=1)


def encode_prompts(
    tokenizer: Any,
    text_encoder: Any,
    prompts: Sequence[str],
    max_token_length: int | None = None,
    clip_skip: int | None = None,
) -> Any:
    """Text-encoder states (B, 2 + 75n, D) for prompts, chunked and clip-skipped as in CONTRACT §G."""
    if clip_skip is not None and not 1 <= clip_skip <= text_encoder.config.num_hidden_layers:
        raise UsageError(f"clip_skip must be between 1 and {text_encoder.config.num_hidden_layers}, not {clip_skip}")
    ids, lengths = tokenize_chunks(tokenizer, prompts, max_token_length)
    for prompt, n_tokens in zip(prompts, lengths, strict=True):
        default_reporter.report(prompt, n_tokens, max_token_length)
    return encode_chunks(text_encoder, ids, clip_skip)
