"""Caption processing: kohya's rules, minus the quirks listed in captions.py."""

from __future__ import annotations

import random

from sdtool.captions import CaptionRules, assemble_caption, process_caption


def run(text: str, seed: int = 0, epoch: int = 1, **rules) -> str:
    return process_caption(text, CaptionRules(**rules), random.Random(seed), epoch)


def test_assemble_skips_empty_parts():
    assert assemble_caption("a cat", "1girl, solo") == "a cat, 1girl, solo"
    assert assemble_caption(None, "1girl, solo") == "1girl, solo"  # kohya: ",1girl, solo"
    assert assemble_caption("a cat", "") == "a cat"


def test_keep_tokens_fixed_and_the_rest_shuffled():
    text = "masterpiece, a, b, c, d, e, f, g"
    outs = {run(text, seed, shuffle_caption=True, keep_tokens=1) for seed in range(20)}
    assert all(o.startswith("masterpiece, ") for o in outs)
    assert len(outs) > 5
    assert all(sorted(o.split(", ")) == sorted(text.split(", ")) for o in outs)


def test_prefix_and_suffix_are_separate_fixed_tags():
    out = run("a, b, c", 3, shuffle_caption=True, caption_prefix="best quality", caption_suffix="sdtool")
    tags = out.split(", ")
    assert tags[0] == "best quality" and tags[-1] == "sdtool" and sorted(tags[1:-1]) == ["a", "b", "c"]


def test_keep_tokens_separator_and_empty_tags():
    out = run("x, y ||| a, , b ||| z", 1, shuffle_caption=True, keep_tokens_separator="|||")
    tags = out.split(", ")
    assert tags[:2] == ["x", "y"] and tags[-1] == "z" and sorted(tags[2:-1]) == ["a", "b"]
    # without shuffling the separator still never reaches the text encoder
    assert run("x ||| a, b", keep_tokens_separator="|||") == "x, a, b"


def test_dropout_rates_and_every_n_epochs():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    assert run("a, b", epoch=2, caption_dropout_every_n_epochs=2) == ""
    assert run("a, b", epoch=3, caption_dropout_every_n_epochs=2) == "a, b"
    kept = [run("a, b, c, d, e, f, g, h", s, caption_tag_dropout_rate=0.5, keep_tokens=1) for s in range(30)]
    assert all(k.startswith("a") for k in kept)
    assert 1 < sum(len(k.split(", ")) for k in kept) / 30 < 8


def test_separator_first_line_and_secondary_separator():
    assert run("a;b ; c", caption_separator=";", shuffle_caption=False) == "a; b; c"
    assert run("a, b\nsecond line") == "a, b"
    assert run("sky;;;cloud, sea", secondary_separator=";;;") == "sky, cloud, sea"


def test_same_seed_same_caption():
    rules = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    assert run("a, b, c, d, e", 7, **rules) == run("a, b, c, d, e", 7, **rules)
