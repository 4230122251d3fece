"""Booru taggers on ONNX Runtime: SmilingWolf WD14 (v2/v3) and DeepDanbooru ONNX exports (CONTRACT §K).

Model layouts:
- WD14 (SmilingWolf): `model.onnx` + `selected_tags.csv` (`tag_id,name,category,count`; output i is CSV row i).
  Input: BGR, float32 0–255, NHWC, the image padded to a centred white square and resized to the graph's size.
- DeepDanbooru ONNX (a converted `deepdanbooru-v3-*` project): `model.onnx` (or the folder's only `.onnx`) +
  `tags.txt` (one tag per line; output i is line i). Assumed preprocessing, from DeepDanbooru's own
  `load_image_for_evaluate`: RGB, float32 0–1, the image resized to fit the input keeping its aspect ratio and
  padded to the input size by repeating its edge pixels (centred). Tags listed in `tags-character.txt` next to it
  are characters, `rating:*` tags are ratings, everything else is general.
The graph's input shape gives the input size and layout (NHWC or NCHW); its outputs are probabilities.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdtool.console import Output, SkipReporter, info, progress_bar, warn
from sdtool.errors import ModelError, UsageError
from sdtool.images import list_images
from sdtool.label.loading import SidecarWriter, check_extension, iter_batches, sidecar_targets
from sdtool.metadata import read_metadata, write_metadata

RATING, GENERAL, CHARACTER = 9, 0, 4
WD14, DEEPDANBOORU = "wd14", "deepdanbooru"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FLUSH_SECONDS = 30.0  # --output-path is rewritten this often, so an interrupted run keeps most of its work


@dataclass(frozen=True)
class TagInfo:
    """One model output: its tag name and Danbooru category (9 rating, 0 general, 4 character, …)."""

    name: str
    category: int


@dataclass(frozen=True)
class TaggerFiles:
    """Where a tagger's graph and labels are, and which layout they follow."""

    onnx: Path
    labels: Path
    style: str


# ---------------------------------------------------------------------------------------------------------- loading


def find_tagger_files(source: str) -> TaggerFiles:
    """A local folder (WD14 or DeepDanbooru layout) or a SmilingWolf hub repo id (downloaded into the HF cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _local_files(folder)
    if folder.exists():
        raise UsageError(f"--model {source}: expected a folder with model.onnx + selected_tags.csv, not a file")
    if not _REPO_ID.match(source):
        raise UsageError(f"--model {source}: no such folder, and not a hub repo id like SmilingWolf/wd-vit-tagger-v3")
    return TaggerFiles(_hub_file(source, "model.onnx"), _hub_file(source, "selected_tags.csv"), WD14)


def _local_files(folder: Path) -> TaggerFiles:
    csv_path, tags_txt = folder / "selected_tags.csv", folder / "tags.txt"
    onnx_files = sorted(folder.glob("*.onnx"))
    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file() and len(onnx_files) == 1 and tags_txt.is_file() and not csv_path.is_file():
        onnx_path = onnx_files[0]  # DeepDanbooru conversions use several file names
    if not onnx_path.is_file():
        raise ModelError(f"{folder}: no model.onnx in this folder", hint="a tagger folder holds model.onnx + labels")
    if csv_path.is_file():
        return TaggerFiles(onnx_path, csv_path, WD14)
    if tags_txt.is_file():
        return TaggerFiles(onnx_path, tags_txt, DEEPDANBOORU)
    raise ModelError(f"{folder}: no selected_tags.csv (WD14) or tags.txt (DeepDanbooru) beside {onnx_path.name}")


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if not isinstance(cached, str):
        info(f"downloading {filename} from {repo_id} (once; kept in the Hugging Face cache)")
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"cannot get {filename} from the hub repo {repo_id}: {text}",
            hint="check the repo id; without internet the files must already be in the Hugging Face cache",
        ) from exc


def read_labels(files: TaggerFiles) -> list[TagInfo]:
    """Tag names and categories, one per model output, from the CSV `category` column or DeepDanbooru's lists."""
    if files.style == WD14:
        return _read_selected_tags(files.labels)
    return _read_deepdanbooru_tags(files.labels)


def _read_selected_tags(path: Path) -> list[TagInfo]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if not {"name", "category"} <= fields:
            raise ModelError(f"{path}: expected the columns name and category, found {sorted(fields)}")
        tags = []
        for line, row in enumerate(reader, start=2):
            try:
                tags.append(TagInfo(row["name"].strip(), int(row["category"])))
            except (ValueError, AttributeError) as exc:
                raise ModelError(f"{path}:{line}: category {row.get('category')!r} is not a number") from exc
    return tags


def _read_deepdanbooru_tags(path: Path) -> list[TagInfo]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    characters_file = path.with_name("tags-character.txt")
    characters = set()
    if characters_file.is_file():
        characters = {line.strip() for line in characters_file.read_text(encoding="utf-8").splitlines()}
    tags = []
    for name in names:
        category = RATING if name.startswith("rating:") else CHARACTER if name in characters else GENERAL
        tags.append(TagInfo(name, category))
    return tags


@dataclass(frozen=True)
class TaggerPreprocessor:
    """Runs in the DataLoader workers: a decoded RGB image → the model's pixels as uint8 HWC (no batch dimension).

    Workers hand over uint8 pixels (a quarter of float32's bytes); `to_model_input` scales them in the main process.
    """

    style: str
    width: int
    height: int
    channels_last: bool

    def __call__(self, image: Any) -> np.ndarray:
        if self.style == WD14:
            return wd14_pixels(image, self.width, self.height)
        return deepdanbooru_pixels(image, self.width, self.height)

    def to_model_input(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of uint8 HWC pixels → float32 in the model's range (WD14 0–255, DeepDanbooru 0–1) and layout."""
        batch = pixels.astype(np.float32)
        if self.style == DEEPDANBOORU:
            batch /= 255.0
        if not self.channels_last:
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch)


def _resize(image: Any, size: tuple[int, int]) -> Any:
    """Area averaging (PIL BOX, like cv2 INTER_AREA) when shrinking, Lanczos when enlarging (as kohya's tagger)."""
    from PIL import Image

    if image.size == size:
        return image
    shrinking = size[0] <= image.size[0] and size[1] <= image.size[1]
    return image.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)


def wd14_pixels(image: Any, width: int, height: int) -> np.ndarray:
    """WD14 geometry: centred white square padding, resize, BGR; uint8 HWC."""
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    array = np.asarray(_resize(square, (width, height)), dtype=np.uint8)
    return np.ascontiguousarray(array[:, :, ::-1])  # RGB → BGR


def wd14_input(image: Any, width: int, height: int) -> np.ndarray:
    """WD14 preprocessing: centred white square padding, resize, BGR, float32 0–255, HWC."""
    return wd14_pixels(image, width, height).astype(np.float32)


def deepdanbooru_pixels(image: Any, width: int, height: int) -> np.ndarray:
    """DeepDanbooru geometry: fit inside the input keeping the aspect ratio, centred, edge padding; RGB uint8 HWC."""
    w, h = image.size
    scale = min(width / w, height / h)
    nw, nh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    array = np.asarray(_resize(image, (nw, nh)), dtype=np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    return np.pad(array, ((top, height - nh - top), (left, width - nw - left), (0, 0)), mode="edge")


def deepdanbooru_input(image: Any, width: int, height: int) -> np.ndarray:
    """DeepDanbooru preprocessing: aspect-preserving fit, edge padding, RGB, float32 0–1, HWC."""
    return deepdanbooru_pixels(image, width, height).astype(np.float32) / 255.0


def stack_pixels(items: list[np.ndarray]) -> Any:
    """Stack per-image pixels into one batch tensor (torch tensors cross from workers through shared memory)."""
    import torch

    return torch.from_numpy(np.stack(items))


class Tagger:
    """An ONNX Runtime session with its labels and input geometry."""

    def __init__(self, source: str, device: str = "auto"):
        import onnxruntime as ort

        self.source = source
        self.files = find_tagger_files(source)
        self.tags = read_labels(self.files)
        providers = _providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # provider fall-back is reported by sdtool itself, once
        # Idle ORT threads spin by default, starving the image-reading workers of CPU between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.files.onnx), options, providers=providers)
        except Exception as exc:
            text = " ".join(str(exc).split())[:300]
            raise ModelError(f"onnxruntime cannot load {self.files.onnx}: {text}") from exc
        self.provider = self.session.get_providers()[0]
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.provider != wanted:
            if device.startswith("cuda"):
                raise ModelError(
                    f"--device {device}: onnxruntime could not start {wanted} and fell back to {self.provider}",
                    hint="check that onnxruntime-gpu matches the installed CUDA/cuDNN (sdtool doctor)",
                )
            warn(f"onnxruntime could not start {wanted}; tagging runs on {self.provider} (slow)")
        self.input_name, self.preprocessor, self.fixed_batch = self._geometry()
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise ModelError(f"{self.files.labels} lists {len(self.tags)} tags but the model has {n_out} outputs")

    def _geometry(self) -> tuple[str, TaggerPreprocessor, int | None]:
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ModelError(f"{self.files.onnx}: expected an image input of rank 4, found shape {shape}")
        if shape[3] == 3:
            channels_last, height, width = True, shape[1], shape[2]
        elif shape[1] == 3:
            channels_last, height, width = False, shape[2], shape[3]
        else:
            raise ModelError(f"{self.files.onnx}: cannot tell the channel axis of input shape {shape}")
        if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
            raise ModelError(f"{self.files.onnx}: the input size is not fixed in the graph ({shape})")
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return inp.name, TaggerPreprocessor(self.files.style, width, height, channels_last), fixed

    def describe(self) -> str:
        """One line for stderr: model, layout, input size and the provider that actually runs."""
        p = self.preprocessor
        return f"tagger {self.source} ({self.files.style}, {p.width}x{p.height}) on {self.provider}"

    def predict(self, pixels: Any) -> np.ndarray:
        """Probabilities, shape (images, tags), for a uint8 HWC batch; a fixed-batch graph gets padded chunks."""
        batch = self.preprocessor.to_model_input(np.asarray(pixels))
        step = self.fixed_batch or len(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            result = self.session.run(None, {self.input_name: chunk})[0]
            outputs.append(np.asarray(result, dtype=np.float32)[:n])
        probs = np.concatenate(outputs)
        if probs.shape[1] != len(self.tags):
            raise ModelError(f"{self.files.labels} lists {len(self.tags)} tags but the model gave {probs.shape[1]}")
        return probs


def _providers(device: str, available: Sequence[str]) -> list[Any]:
    cuda = "CUDAExecutionProvider"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if cuda not in available:
            raise UsageError(
                f"--device {device}: this onnxruntime has no CUDA provider (available: {', '.join(available)})",
                hint="install onnxruntime-gpu instead of onnxruntime, or use --device cpu",
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [(cuda, {"device_id": index}), "CPUExecutionProvider"]
    if device == "mps":
        raise UsageError("--device mps is not supported by the ONNX tagger", hint="use --device cpu")
    return [cuda, "CPUExecutionProvider"] if cuda in available else ["CPUExecutionProvider"]


# -------------------------------------------------------------------------------------------------------- tag text


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


# ---------------------------------------------------------------------------------------------------------- output


class MetadataSink:
    """`--output-path`: kohya's metadata JSON (`{path: {"tags", "image_size"}}`) or JSONL, merged into what exists."""

    def __init__(self, path: Path):
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl"):
            raise UsageError(f"--output-path {path}: expected a .json or .jsonl file")
        self.path = path
        self.jsonl = suffix == ".jsonl"
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
    """The text of an existing tags sidecar, None when there is none; ValueError naming the file when unreadable."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise ValueError(f"its tags file {path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ValueError(f"its tags file {path.name} cannot be read ({exc.strerror or exc})") from exc


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
    check_extension(extension, "--caption-extension")
    if overwrite and append:
        raise UsageError("--overwrite and --append exclude each other")
    sink = MetadataSink(output_path) if output_path is not None else None
    run = TagRun()
    pairs = sidecar_targets(list_images(dirs, recursive), extension, skips)

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
        info(f"kept the tags of {run.kept} images already in {where} (--overwrite replaces, --append adds)")
    if not todo:
        return run

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
                            writer.write(target, text + "\n", report(image, target, text, final))
                advance(len(batch.indices) + len(batch.failures))
    finally:
        if sink is not None:
            sink.flush()  # also on errors and Ctrl-C: what was tagged stays tagged
    if sink is not None:
        out.path(sink.path)
    return run
