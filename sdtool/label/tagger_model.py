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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtool.console import warn
from sdtool.errors import ModelError, UsageError

# Danbooru's category numbers in selected_tags.csv; the two tagger kinds.
RATING, GENERAL, CHARACTER = 9, 0, 4
WD14, DEEPDANBOORU = "wd14", "deepdanbooru"


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def find_tagger_files(source: str) -> TaggerFiles:
    """A local folder (WD14 or DeepDanbooru layout) or a SmilingWolf hub repo id (downloaded into the HF cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _local_files(folder)
    if folder.exists():
        raise UsageError(f"--model {source}: expected a folder with model.onnx + selected_tags.csv, not a file")
    if not _REPO_ID.match(source):
        raise UsageError(f"--model {source}: no such folder, and not a hub repo id like SmilingWolf/wd-vit-tagger-v3")
    from sdtool.models import hub

    files = ("model.onnx", "selected_tags.csv")
    snapshot = hub.local_model(source, what="the tagger", files=files)  # the local cache first, or downloaded once
    return TaggerFiles(snapshot / files[0], snapshot / files[1], WD14)


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


def read_labels(files: TaggerFiles) -> list[TagInfo]:
    """Tag names and categories, one per model output, from the CSV `category` column or DeepDanbooru's lists.

    A name with control characters (a CSV field with a line break, say) would break the one-line sidecar: they
    become spaces, and the file is named once.
    """
    tags = _read_selected_tags(files.labels) if files.style == WD14 else _read_deepdanbooru_tags(files.labels)
    cleaned = [TagInfo(_plain_name(t.name), t.category) for t in tags]
    changed = [t.name for t, c in zip(tags, cleaned, strict=True) if t.name != c.name]
    if changed:
        warn(
            f"{files.labels}: {len(changed)} tag name(s) with control characters, written with spaces instead "
            f"(e.g. {changed[0]!r})"
        )
    return cleaned


def _plain_name(name: str) -> str:
    from sdtool.label.loading import one_line

    cleaned = one_line(name)
    return cleaned if cleaned == name else " ".join(cleaned.split())


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
