"""Tag text (CONTRACT §K): which tags a tagger's probabilities give, in kohya's order and spelling, and how new tags
join the ones a sidecar already has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdtool.label.tagger_model import CHARACTER, RATING, TagInfo


def normalize_tag(tag: str) -> str:
    """The form tags are compared in: underscores as spaces, so `long_hair` matches `long hair`."""
    return tag.replace("_", " ").strip()


def split_tag_list(text: str) -> list[str]:
    """A comma-separated flag value → stripped, non-empty tags in order."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class TagOptions:
    """How probabilities become the tag text (CONTRACT §K)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    use_rating_tags: bool = False
    character_tags_first: bool = False
    remove_underscore: bool = False
    undesired_tags: tuple[str, ...] = ()
    always_first_tags: tuple[str, ...] = ()
    separator: str = ", "

    def display(self, name: str) -> str:
        """`--remove-underscore` only touches tags longer than 3 characters, so kaomoji like `^_^` survive."""
        if self.remove_underscore and len(name) > 3:
            return name.replace("_", " ")
        return name


def select_tags(probs: np.ndarray, tags: Sequence[TagInfo], options: TagOptions) -> list[str]:
    """The tags of one image, in output order: [always-first…], [rating], general/character by confidence."""
    undesired = {normalize_tag(t) for t in options.undesired_tags}
    general: list[tuple[float, int]] = []
    characters: list[tuple[float, int]] = []
    best_rating: tuple[float, int] | None = None
    for index, (tag, p) in enumerate(zip(tags, probs.tolist(), strict=True)):
        if tag.category == RATING:
            if best_rating is None or p > best_rating[0]:
                best_rating = (p, index)
        elif tag.category == CHARACTER:
            if p >= options.character_threshold:
                characters.append((p, index))
        elif p >= options.general_threshold:  # general (0) and any other Danbooru category (artist, copyright …)
            general.append((p, index))

    def names(found: list[tuple[float, int]]) -> list[str]:
        found.sort(key=lambda item: (-item[0], item[1]))  # most confident first; ties keep the model's order
        return [options.display(tags[index].name) for _, index in found]

    ordered = names(characters) + names(general) if options.character_tags_first else names(general) + names(characters)
    if options.use_rating_tags and best_rating is not None:
        ordered.insert(0, options.display(tags[best_rating[1]].name))
    ordered = [t for t in ordered if normalize_tag(t) not in undesired]
    for wanted in reversed(options.always_first_tags):
        key = normalize_tag(wanted)
        hit = next((t for t in ordered if normalize_tag(t) == key), None)
        if hit is not None:
            ordered.remove(hit)
            ordered.insert(0, hit)
    return ordered


def append_tags(existing: str, new: Sequence[str], separator: str) -> list[str]:
    """Existing tags first (as written), then the new ones not already present (compared without underscores)."""
    splitter = separator.strip() or separator
    old = [t.strip() for t in existing.replace("\n", splitter).split(splitter) if t.strip()]
    seen = {normalize_tag(t) for t in old}
    added = []
    for tag in new:
        if normalize_tag(tag) not in seen:
            seen.add(normalize_tag(tag))
            added.append(tag)
    return old + added
