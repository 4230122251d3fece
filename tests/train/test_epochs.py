"""One DataLoader pass across epochs (sdtool.train.epochs): the loop sees exactly each epoch's batches, in order,
from wherever the sampler was set, and the workers are not restarted at epoch ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdtool.train.dataset import BucketBatchSampler
from sdtool.train.epochs import EpochSpanningSampler, EpochView


def _sampler(n: int = 11, batch: int = 4) -> BucketBatchSampler:
    items = [SimpleNamespace(subset=0, dataset=0, bucket=(64, 64 if i % 3 else 128)) for i in range(n)]
    return BucketBatchSampler(items, [SimpleNamespace(num_repeats=1)], [batch], seed=5)


class _Keys:
    def __getitem__(self, key):
        return key


class _CountingLoader(torch.utils.data.DataLoader):
    starts = 0

    def __iter__(self):
        type(self).starts += 1
        return super().__iter__()


def _view(sampler, workers):
    _CountingLoader.starts = 0
    loader = _CountingLoader(
        _Keys(), batch_sampler=EpochSpanningSampler(sampler), num_workers=workers, collate_fn=lambda keys: keys
    )
    return EpochView(loader, sampler)


@pytest.mark.parametrize("workers", [0, 1])
def test_each_iteration_is_one_epoch_and_the_stream_runs_on(workers):
    sampler = _sampler()
    view = _view(sampler, workers)
    assert len(view) == len(sampler) == 3  # 7 square images in batches of 4 and 3, 4 tall ones in one
    for epoch in range(3):
        sampler.set_position(epoch, 0)
        assert list(view) == list(sampler.keys(epoch))
    assert _CountingLoader.starts == 1


def test_a_position_off_the_stream_restarts_it_there():
    sampler = _sampler()
    view = _view(sampler, 0)
    sampler.set_position(0, 0)
    it = iter(view)
    first = next(it)
    assert first == next(sampler.keys(0))
    # The loop stopped after one batch (a run interrupted mid-epoch) and resumes at epoch 2, batch 1.
    sampler.set_position(2, 1)
    assert list(view) == list(sampler.keys(2, 1))
    assert _CountingLoader.starts == 2
    sampler.set_position(3, 0)  # where the stream already is
    assert list(view) == list(sampler.keys(3))
    assert _CountingLoader.starts == 2


def test_an_empty_sampler_yields_nothing():
    sampler = _sampler(n=0)
    view = _view(sampler, 0)
    sampler.set_position(0, 0)
    assert list(view) == [] and list(EpochSpanningSampler(sampler)) == []
