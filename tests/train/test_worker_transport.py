"""Batches from DataLoader workers: small tensors come by value (no shared-memory hand-over), large ones in shared
memory, and both arrive equal to what the worker collated."""

from __future__ import annotations

import torch

from sdtool.train.distributed import BY_VALUE_BYTES, ShardedCollate


def _collate(samples):
    return {
        "latents": torch.stack([s["x"] for s in samples]),
        "input_ids": [torch.stack([s["ids"] for s in samples]), torch.stack([s["ids"] for s in samples]).t()],
        "big": torch.stack([s["big"] for s in samples]),
        "half": torch.stack([s["x"] for s in samples]).bfloat16(),
        "captions": [s["caption"] for s in samples],
    }


class _Data:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        sample = {"x": torch.randn(4, 8, 8, generator=g), "ids": torch.arange(77) + i, "caption": f"c{i}"}
        sample["big"] = torch.full((BY_VALUE_BYTES // 4,), float(i))  # one float32 sample is already the limit
        return {**sample, "shard": "s"}


def test_small_tensors_come_by_value_and_large_ones_in_shared_memory():
    collate = ShardedCollate(_collate)
    expected = [collate([_Data()[i] for i in (0, 1)]), collate([_Data()[i] for i in (2, 3)])]
    loader = torch.utils.data.DataLoader(_Data(), batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    for got, want in zip(batches, expected, strict=True):
        assert got["shard"] == "s" and got["captions"] == want["captions"]
        for key in ("latents", "big", "half"):
            assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype
        for g, w in zip(got["input_ids"], want["input_ids"], strict=True):
            assert torch.equal(g, w)
        # By value: plain process memory. Over the limit, and bfloat16 (NumPy has no such dtype): shared memory.
        assert not got["latents"].is_shared() and not any(t.is_shared() for t in got["input_ids"])
        assert got["big"].is_shared() and got["half"].is_shared()
    # In the training process itself (no worker) nothing is wrapped.
    assert isinstance(expected[0]["latents"], torch.Tensor)
