"""Validation (CONTRACT §O): which images are held out, the config keys, the fixed timesteps and the schedule."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from sdtool.errors import ConfigError
from sdtool.train.validation import should_validate, validation_timesteps
from tests.train.conftest import dataset_toml, make_dataset, write_config

HEAD = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
seed = 7
"""


def load(tmp_path, text, overrides=()):
    from sdtool.train.config import load_config

    return load_config(
        write_config(tmp_path / "c.toml", HEAD.format(model=tmp_path, out=tmp_path / "o") + text), list(overrides)
    )


def plan_of(cfg):
    from sdtool.train.plan import make_plan

    return make_plan(cfg)


def held_names(plan) -> list[str]:
    return sorted(item.image.name for item in plan.val_items)


def oracle_split(names: list[str], seed: int, fraction: float) -> list[str]:
    """Independently: the round(n × fraction) names with the smallest blake2b-64 of "seed\\0name" (as documented)."""

    def h(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest(), "little") >> 1

    return sorted(sorted(names, key=h)[: round(len(names) * fraction)])


def test_validation_split_holds_out_a_seeded_hash_choice_per_subset(tmp_path, monkeypatch):
    images, meta = make_dataset(tmp_path / "data", 10)
    cfg = load(tmp_path, "validation_split = 0.3\n" + dataset_toml(meta, images))
    plan = plan_of(cfg)
    names = [f"img{i}.png" for i in range(10)]
    assert held_names(plan) == oracle_split(names, 7, 0.3)  # validation_seed unset: the run's seed (kohya)
    assert len(plan.items) == 7 and not {i.image for i in plan.items} & {i.image for i in plan.val_items}
    # Never trained on: the sampler's batches hold training items only.
    trained = {plan.items[i].image for batch in plan.sampler.batches(0) for i in batch}
    assert trained == {i.image for i in plan.items}

    # The same images with the metadata in another order, in another folder, or on 2 processes.
    entries = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(reversed(list(entries.items())))))
    assert held_names(plan_of(cfg)) == held_names(plan)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved)
    cfg_moved = load(tmp_path, "validation_split = 0.3\n" + dataset_toml(moved / "meta.json", moved / "images"))
    assert held_names(plan_of(cfg_moved)) == held_names(plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert held_names(plan_of(cfg)) == held_names(plan)
    monkeypatch.delenv("WORLD_SIZE")

    # validation_seed decides, kohya's count is round(n × split), and the dataset level wins over the top level.
    other = load(tmp_path, "validation_split = 0.3\nvalidation_seed = 11\n" + dataset_toml(meta, images))
    assert held_names(plan_of(other)) == oracle_split(names, 11, 0.3)
    table = dataset_toml(meta, images).replace("batch_size = 1", "batch_size = 1\nvalidation_split = 0.25")
    assert len(plan_of(load(tmp_path, "validation_split = 0.9\n" + table)).val_items) == round(10 * 0.25) == 2


def test_split_is_per_subset_and_a_validation_dataset_is_all_validation(tmp_path):
    a_images, a_meta = make_dataset(tmp_path / "a", 6)
    b_images, b_meta = make_dataset(tmp_path / "b", 4)
    c_images, c_meta = make_dataset(tmp_path / "c", 3)
    two_subsets = dataset_toml(a_meta, a_images) + "  [[datasets.subsets]]\n"
    two_subsets += f'  image_dir = "{b_images}"\n  metadata_file = "{b_meta}"\n'
    validation = dataset_toml(c_meta, c_images).replace("batch_size = 1", "batch_size = 1\nvalidation = true")
    plan = plan_of(load(tmp_path, "validation_split = 0.5\n" + two_subsets + validation))
    held = {}
    for item in plan.val_items:
        held.setdefault(item.image.parent.parent.name, []).append(item.image.name)
    assert {k: len(v) for k, v in held.items()} == {"a": 3, "b": 2, "c": 3}  # round(6/2), round(4/2), all of c
    assert sorted(held["b"]) == oracle_split([f"img{i}.png" for i in range(4)], 7, 0.5)
    assert {s.how for s in plan.splits} == {"validation_split 0.5, seed 7", "validation = true"}
    assert all(item.dataset == 0 for item in plan.items)  # the validation dataset trains nothing


def test_dry_run_shows_the_split(cli, tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "data", 8)
    text = HEAD.format(model=tiny_v1, out=tmp_path / "o") + "validation_split = 0.25\ncache_latents = false\n"
    result = cli("train", write_config(tmp_path / "c.toml", text + dataset_toml(meta, images)), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "validation: 2 images held out of training (never trained on), 6 train" in result.stderr
    assert f"dataset 0, {meta}: 2 of 8 (validation_split 0.25, seed 7)" in result.stderr
    for name in oracle_split([f"img{i}.png" for i in range(8)], 7, 0.25):
        assert str(images / name) in result.stderr
    assert "6 images, 6 batches per epoch" in result.stderr  # the bucket plan counts training images only


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("validation_split = 1.0\n", "validation_split: input should be less than 1"),
        ("validate_every_n_steps = 5\n", "validate_every_n_steps: no validation images; set validation_split"),
        ("save_best = true\n", "save_best: no validation images"),
        ("validation_split = 0.1\nvalidation_weights = 'ema'\n", "validation_weights: chooses between"),
        ("validation_split = 0.1\nvalidation_timesteps = [0, 1000]\n", "validation_timesteps: a list of distinct"),
        ("validation_split = 0.1\nvalidation_timesteps = 0\n", "validation_timesteps: a count from 1 to 100"),
    ],
)
def test_validation_keys_are_checked_before_anything_loads(tmp_path, text, message):
    images, meta = make_dataset(tmp_path / "data", 2)
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text + dataset_toml(meta, images))
    assert any(message in p for p in exc.value.problems), exc.value.problems


def test_a_validation_dataset_refuses_what_it_would_ignore(tmp_path):
    images, meta = make_dataset(tmp_path / "data", 2)
    v_images, v_meta = make_dataset(tmp_path / "val", 2)
    validation = dataset_toml(v_meta, v_images, flip_aug=True).replace(
        "batch_size = 1", "batch_size = 1\nvalidation = true"
    )
    with pytest.raises(ConfigError) as exc:
        load(
            tmp_path,
            dataset_toml(meta, images)
            + validation.replace("validation = true", "validation = true\nvalidation_split = 0.5"),
        )
    problems = "\n".join(exc.value.problems)
    assert "datasets[1].subsets[0].flip_aug: has no effect on a validation dataset" in problems
    assert "datasets[1].validation_split: a dataset with validation = true is all validation images" in problems
    with pytest.raises(ConfigError, match="expected true or false"):
        load(tmp_path, validation.replace("validation = true", 'validation = "yes"').replace("  flip_aug = true\n", ""))
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, validation.replace("  flip_aug = true\n", ""))
    assert "every dataset has validation = true; nothing is left to train on" in "\n".join(exc.value.problems)
    # Inherited from [general], flip_aug applies to the training data; the validation images stay unflipped.
    cfg = load(
        tmp_path,
        "[general]\nflip_aug = true\n" + dataset_toml(meta, images) + validation.replace("  flip_aug = true\n", ""),
    )
    assert [s.options["flip_aug"] for d in cfg.datasets for s in d.subsets] == [True, False]
    assert "validation = true" in cfg.to_toml() and "validation_split" not in cfg.to_toml()


def test_kohya_validation_keys_are_accepted_now(tmp_path):
    images, meta = make_dataset(tmp_path / "data", 4)
    # kohya's schema rejects an int 0 (reference §2, bug 32); sdtool takes it, and a split of 0 holds nothing out.
    cfg = load(tmp_path, "validation_split = 0\nvalidation_seed = 3\n" + dataset_toml(meta, images))
    assert cfg.datasets[0].validation_split == 0 and plan_of(cfg).val_items == []
    # A split too small to hold out a single image is refused before anything loads, not silently skipped.
    with pytest.raises(ConfigError, match="validation_split holds no image out"):
        plan_of(load(tmp_path, "validation_split = 0.1\n" + dataset_toml(meta, images)))
    printed = load(tmp_path, "validation_split = 0.5\nvalidation_seed = 3\n" + dataset_toml(meta, images)).to_toml()
    assert "validation_split = 0.5\nvalidation_seed = 3" in printed  # printed with its dataset, where it applies


def test_fixed_timesteps_are_kohyas_spread_or_the_given_list():
    # kohya train_network.py: np.linspace(min_timestep, max_timestep, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]
    assert validation_timesteps(4, 0, 1000) == list(np.linspace(0, 1000, 6, dtype=int)[1:-1]) == [200, 400, 600, 800]
    assert validation_timesteps(3, 100, 900) == list(np.linspace(100, 900, 5, dtype=int)[1:-1]) == [300, 500, 700]
    assert validation_timesteps([900, 50], 0, 1000) == [50, 900]


@pytest.mark.parametrize(
    ("step", "epoch", "steps", "epochs", "epoch_end", "expected"),
    [
        (4, 1, None, None, True, True),  # neither key: every epoch end (kohya)
        (3, 0, None, None, False, False),
        (4, 1, 2, None, True, True),  # a step multiple at an epoch end still counts
        (6, 1, 2, None, False, True),
        (5, 1, 2, None, True, False),  # only the step key: no epoch validation
        (8, 2, None, 2, True, True),
        (4, 1, None, 2, True, False),
        (10, 2, 5, 3, False, True),
    ],
)
def test_when_validation_runs(step, epoch, steps, epochs, epoch_end, expected):
    assert should_validate(step, epoch, every_n_steps=steps, every_n_epochs=epochs, epoch_end=epoch_end) is expected


def test_changing_when_validation_runs_does_not_block_a_resume(tmp_path, capsys):
    from sdtool.train.checkpoints import check_resume_config, config_record

    images, meta = make_dataset(tmp_path / "data", 4)
    before = config_record(load(tmp_path, "validation_split = 0.5\n" + dataset_toml(meta, images)))
    keys = "validate_every_n_steps = 3\nvalidation_timesteps = [100]\nsave_best = true\n"
    after = config_record(load(tmp_path, "validation_split = 0.5\n" + keys + dataset_toml(meta, images)))
    check_resume_config(before, after, False, False)
    assert "changed config" not in capsys.readouterr().err
    other_split = config_record(load(tmp_path, "validation_split = 0.25\n" + dataset_toml(meta, images)))
    check_resume_config(before, other_split, False, False)
    assert "changed config" in capsys.readouterr().err  # a different split changes the training data: said
