"""Which images are validation images (CONTRACT §O): held out of training, never trained on.

Two ways to name them, per dataset:

* `validation = true` on a `[[datasets]]` table (sdtool's key): every image of that dataset.
* `validation_split = f` (kohya's key, at `[general]`, `[[datasets]]` or top level): in each subset, the
  `round(n × f)` images with the smallest hash of (`validation_seed`, image path) — kohya's count, but never the
  same image on both sides (kohya's `split_train_val` takes `ceil(n(1 − f))` for training and `round(n·f)` for
  validation, which overlap for e.g. n = 3, f = 0.5). `validation_seed` defaults to the run's seed, as in kohya.

The image path is taken relative to the subset's `image_dir` (or its metadata file's folder), so the split depends
only on the seed and the subset's images: not on their order in the metadata, the number of processes, a resume,
or where the dataset folder lives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sdtool.console import warn
from sdtool.train.config.schema import DatasetSpec
from sdtool.train.dataset import TrainItem


@dataclass(frozen=True)
class SubsetSplit:
    """How one subset was split: `held` of its `images` are validation images, chosen `how`."""

    dataset: int
    subset: int  # index among all subsets (the items' `subset`)
    name: str  # the subset's metadata file
    images: int
    held: int
    how: str


def split_seed(spec: DatasetSpec, run_seed: int) -> int:
    """The seed of a dataset's split (and of its validation noise): `validation_seed`, else the run's seed."""
    return spec.validation_seed if spec.validation_seed is not None else run_seed


def image_key(image: Path, root: Path) -> str:
    """An image's name within its subset: the path relative to the subset's folder, `/`-separated."""
    try:
        return image.relative_to(root).as_posix()
    except ValueError:
        return image.as_posix()


def key_hash(seed: int, key: str) -> int:
    """A 63-bit hash of (seed, image key): the split's order, and the seed of the image's validation noise."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def subset_roots(specs: list[DatasetSpec]) -> list[Path]:
    """The folder image keys are relative to, for every subset in the items' order."""
    return [sub.image_dir or sub.metadata_file.parent for spec in specs for sub in spec.subsets]


def split_validation(
    items: list[TrainItem], specs: list[DatasetSpec], run_seed: int
) -> tuple[list[TrainItem], list[TrainItem], list[SubsetSplit]]:
    """(training items, validation items, one SubsetSplit per subset that holds images out), orders kept."""
    roots = subset_roots(specs)
    by_subset: dict[int, list[TrainItem]] = {}
    for item in items:
        by_subset.setdefault(item.subset, []).append(item)
    held: set[int] = set()
    splits: list[SubsetSplit] = []
    for s, members in sorted(by_subset.items()):
        spec = specs[members[0].dataset]
        name = str(spec.subsets[s - _first_subset(specs, members[0].dataset)].metadata_file)
        if spec.validation:
            held.update(id(item) for item in members)
            splits.append(SubsetSplit(members[0].dataset, s, name, len(members), len(members), "validation = true"))
            continue
        if not spec.validation_split:
            continue
        seed = split_seed(spec, run_seed)
        count = round(len(members) * spec.validation_split)
        ranked = sorted(members, key=lambda item: (key_hash(seed, image_key(item.image, roots[s])), item.image))
        held.update(id(item) for item in ranked[:count])
        how = f"validation_split {spec.validation_split:g}, seed {seed}"
        splits.append(SubsetSplit(members[0].dataset, s, name, len(members), count, how))
        if count == 0:
            warn(f"{name}: validation_split {spec.validation_split:g} of {len(members)} images holds none out")
        elif count == len(members):
            warn(f"{name}: validation_split {spec.validation_split:g} holds out all {count} images; none train")
    train = [item for item in items if id(item) not in held]
    validation = [item for item in items if id(item) in held]
    return train, validation, splits


def _first_subset(specs: list[DatasetSpec], dataset: int) -> int:
    return sum(len(spec.subsets) for spec in specs[:dataset])
