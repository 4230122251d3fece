"""Caption assembly and per-step processing, like kohya's `process_caption` minus its quirks.

Deviations from kohya (each one is a bug or surprise listed in reference/kohya-fine-tune.md §1.7.3 / §5):
- `caption_prefix` / `caption_suffix` are their own tags, always kept, never shuffled or counted in
  `keep_tokens` (kohya glues them to the first/last tag with a space, so they shuffle with it).
- Tags are re-joined with the configured `caption_separator` plus a space (kohya always uses ", ").
- Empty tags (`"a,,b"`) are dropped (kohya keeps them on the `keep_tokens` path).
- A `keep_tokens_separator` in a caption never reaches the text encoder, even when nothing is shuffled
  (kohya passes the literal "|||" through when shuffling and dropout are off).
- Caption and tags are joined only when both are non-empty (kohya produces ",tags" for a missing caption).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CaptionRules:
    """The caption keys of one subset (resolved from subset / dataset / general)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CaptionRules:
        return cls(**{k: options[k] for k in cls.__dataclass_fields__ if options.get(k) is not None})

    @property
    def joiner(self) -> str:
        sep = self.caption_separator
        return sep if sep.endswith((" ", "\t")) else sep + " "


def assemble_caption(caption: str | None, tags: str | None, separator: str = ",") -> str:
    """Metadata `caption` + separator + `tags`, skipping whichever is empty."""
    parts = [p.strip() for p in (caption or "", tags or "") if p and p.strip()]
    sep = separator if separator.endswith(" ") else separator + " "
    return sep.join(parts)


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(text: str, rules: CaptionRules, rng: random.Random, epoch: int = 1) -> str:
    """The caption a sample gets this step: dropout, first line, keep/shuffle/tag dropout, prefix and suffix."""
    if rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate:
        return ""
    if rules.caption_dropout_every_n_epochs > 0 and epoch % rules.caption_dropout_every_n_epochs == 0:
        return ""
    text = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    sep = rules.caption_separator
    if rules.keep_tokens_separator and rules.keep_tokens_separator in text:
        parts = text.split(rules.keep_tokens_separator)
        fixed = _split(parts[0], sep)
        flex = _split(parts[1], sep) if len(parts) > 1 else []
        tail = [t for part in parts[2:] for t in _split(part, sep)]
    else:
        tags = _split(text, sep)
        fixed, flex, tail = tags[: rules.keep_tokens], tags[rules.keep_tokens :], []
    if rules.shuffle_caption:
        rng.shuffle(flex)
    if rules.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= rules.caption_tag_dropout_rate]
    out = [rules.caption_prefix] if rules.caption_prefix else []
    out += fixed + flex + tail
    if rules.caption_suffix:
        out.append(rules.caption_suffix)
    joined = rules.joiner.join(out)
    if rules.secondary_separator:
        joined = joined.replace(rules.secondary_separator, rules.joiner)
    return joined


def fixed_caption(text: str, rules: CaptionRules) -> str:
    """The caption a text always becomes when nothing random applies (what text-encoder outputs are cached for)."""
    return process_caption(text, rules, random.Random(0), 1)
