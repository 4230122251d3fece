"""`sdtool tag`: tag a folder of images with an ONNX tagger (`tagger_model`), choosing tags by the rules in `tags`,
into `.txt` sidecars or kohya metadata (`--output-path`), which is rewritten every half minute so an interrupted
run keeps most of its work.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.console import Output, SkipReporter, info, loading, plural, progress_bar, warn
from sdtool.errors import InputError, UsageError
from sdtool.fsutil import clean_leftovers_of, read_sidecar_text
from sdtool.images import find_images
from sdtool.label.loading import SidecarWriter, check_extension, iter_batches, sidecar_targets
from sdtool.label.tagger_model import RATING, Tagger, stack_pixels
from sdtool.label.tags import TagOptions, append_tags, select_tags
from sdtool.metadata import read_metadata, write_metadata

_FLUSH_SECONDS = 30.0  # --output-path is rewritten this often, so an interrupted run keeps most of its work


class MetadataSink:
    """`--output-path`: kohya's metadata JSON (`{path: {"tags", "image_size"}}`) or JSONL, merged into what exists."""

    def __init__(self, path: Path):
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl"):
            raise UsageError(f"--output-path {path}: expected a .json or .jsonl file")
        self.path = path
        self.jsonl = suffix == ".jsonl"
        clean_leftovers_of(path)  # what a killed run left (a live one's write is kept)
        self.entries: dict[str, dict[str, Any]] = read_metadata(path) if path.exists() else {}
        self.dirty = False
        self.last_flush = time.monotonic()

    @staticmethod
    def key(image: Path) -> str:
        """Absolute path keys (CONTRACT §D)."""
        return os.path.abspath(image)

    def tags_of(self, image: Path) -> str | None:
        """The tags already stored for an image, if any."""
        entry = self.entries.get(self.key(image))
        tags = entry.get("tags") if entry else None
        return tags if isinstance(tags, str) and tags else None

    def put(self, image: Path, tags: str, size: tuple[int, int]) -> None:
        """Set `tags` and `image_size` for an image, keeping its other fields."""
        key = self.key(image)
        entry = self.entries.setdefault(key, {})
        entry["tags"] = tags
        entry["image_size"] = [size[0], size[1]]
        self.dirty = True
        if time.monotonic() - self.last_flush > _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the file atomically (only when something changed)."""
        if not self.dirty:
            return
        write_metadata(self.path, self.entries)
        self.dirty = False
        self.last_flush = time.monotonic()


def _read_tags_file(path: Path) -> str | None:
    """The text of an existing tags sidecar, None when there is none; ValueError naming the file when unreadable
    (not a regular file, too large, not UTF-8)."""
    try:
        return read_sidecar_text(path)
    except InputError as exc:
        raise ValueError(f"its tags file {path.name}: {exc.reason}") from exc


@dataclass
class TagRun:
    """What a tag run did, and how often each tag was written."""

    written: int = 0
    kept: int = 0
    frequency: Counter[str] = field(default_factory=Counter)


def tag_images(
    dirs: Sequence[Path],
    *,
    model: str,
    options: TagOptions,
    extension: str,
    overwrite: bool,
    append: bool,
    output_path: Path | None,
    recursive: bool,
    batch_size: int,
    workers: int | None,
    device: str,
    out: Output,
    skips: SkipReporter,
) -> TagRun:
    """Tag every image in `dirs` that has no tags yet (all of them with `overwrite` or `append`)."""
    check_extension(extension, "--tags-extension")
    if overwrite and append:
        raise UsageError("--overwrite and --append exclude each other")
    sink = MetadataSink(output_path) if output_path is not None else None
    run = TagRun()
    pairs = sidecar_targets(find_images(dirs, recursive), extension, skips)

    def has_tags(image: Path, target: Path) -> bool:
        # Only whether a sidecar exists: its text is read for --append alone, so that an odd file (not UTF-8)
        # beside one image cannot stop the whole run.
        return sink.tags_of(image) is not None if sink is not None else target.is_file()

    todo = [(image, target) for image, target in pairs if overwrite or append or not has_tags(image, target)]
    run.kept = len(pairs) - len(todo)
    previous: dict[Path, str | None] = {}
    if append:
        readable = []
        for image, target in todo:
            try:
                previous[image] = sink.tags_of(image) if sink is not None else _read_tags_file(target)
            except ValueError as exc:
                skips.skip(image, f"{exc}; fix it, or pass --overwrite to replace it")
                continue
            readable.append((image, target))
        todo = readable
    if run.kept:
        where = output_path if sink is not None else f"{extension} files"
        info(f"kept the tags of {plural(run.kept, 'image')} already in {where} (--overwrite replaces, --append adds)")
    if not todo:
        return run

    with loading(f"the tagger {model}"):
        tagger = Tagger(model, device)
    info(tagger.describe())
    if options.use_rating_tags and not any(t.category == RATING for t in tagger.tags):
        warn("--use-rating-tags: this model has no rating tags")
    images = [image for image, _ in todo]

    def report(image: Path, target: Path | None, text: str, tags: list[str]) -> Callable[[], None]:
        def done() -> None:
            if target is not None:
                out.path(target)
            out.record({"path": str(image), "tags": text})
            run.frequency.update(tags)
            run.written += 1
            skips.ok()

        return done

    try:
        with progress_bar("tag", len(todo)) as advance, SidecarWriter() as writer:
            for batch in iter_batches(images, tagger.preprocessor, stack_pixels, batch_size, workers):
                for index, reason in batch.failures:
                    skips.skip(images[index], reason)
                if batch.indices:
                    probs = tagger.predict(batch.data)
                    for row, index, size in zip(probs, batch.indices, batch.sizes, strict=True):
                        image, target = todo[index]
                        new = select_tags(row, tagger.tags, options)
                        old = previous.get(image)
                        final = append_tags(old, new, options.separator) if old else new
                        text = options.separator.join(final)
                        if sink is not None:
                            sink.put(image, text, size)
                            report(image, None, text, final)()
                        else:
                            writer.write(target, text, report(image, target, text, final))
                advance(len(batch.indices) + len(batch.failures))
    finally:
        if sink is not None:
            sink.flush()  # also on errors and Ctrl-C: what was tagged stays tagged
    if sink is not None:
        out.path(sink.path)
    return run
