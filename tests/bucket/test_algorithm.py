"""CONTRACT §E: bucket lists and assignments equal kohya's (tables transcribed from kohya-fine-tune.md §1.6)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sdtool.bucket.algorithm import (
    BucketError,
    BucketSettings,
    adjust_min_max_to_steps,
    crop_ltrb,
    is_degenerate,
    make_bucket_resolutions,
    parse_resolution,
    round_to_steps,
    select_bucket,
)

# --- bucket sets (min 256, step 64) -----------------------------------------------------------------------------
BUCKETS_512_MAX_1024 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip
BUCKETS_768_MAX_1024 = [
    (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024), (640, 896),
    (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320), (1024, 384), (1024, 448),
    (1024, 512), (1024, 576),
]  # fmt: skip
# The reference elides the middle of the next two rows; the full lists were worked out by hand from the formula
# and contain every bucket the reference names, with the counts it gives (23 and 41).
BUCKETS_768_MAX_1280 = [
    (256, 1280), (320, 1280), (384, 1280), (448, 1216), (448, 1280), (512, 1088), (512, 1152), (576, 960),
    (576, 1024), (640, 896), (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 576), (1088, 512),
    (1152, 512), (1216, 448), (1280, 256), (1280, 320), (1280, 384), (1280, 448),
]  # fmt: skip
BUCKETS_1024_MAX_1024 = sorted({(w, 1024) for w in range(256, 1025, 64)} | {(1024, w) for w in range(256, 1025, 64)})
BUCKETS_1024_MAX_2048 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280),
    (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960), (1152, 896), (1216, 832),
    (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 256), (2048, 320), (2048, 384), (2048, 448),
    (2048, 512),
]  # fmt: skip
# Named in the reference's elided rows.
NAMED_768_1280 = [
    (448, 1216), (448, 1280), (512, 1088), (512, 1152), (576, 960), (576, 1024), (640, 896), (704, 832), (768, 768),
    (1280, 256), (1280, 320), (1280, 384), (1280, 448),
]  # fmt: skip
NAMED_1024_2048 = [
    (256, 2048), (512, 1856), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (2048, 256), (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reso", "max_size", "expected", "count"),
    [
        (512, 1024, BUCKETS_512_MAX_1024, 17),
        (768, 1024, BUCKETS_768_MAX_1024, 19),
        (768, 1280, BUCKETS_768_MAX_1280, 23),
        (1024, 1024, BUCKETS_1024_MAX_1024, 25),
        (1024, 2048, BUCKETS_1024_MAX_2048, 41),
    ],
)
def test_bucket_sets_match_kohya(reso, max_size, expected, count):
    got = make_bucket_resolutions((reso, reso), 256, max_size, 64)
    assert len(expected) == count
    assert got == expected
    assert BucketSettings((reso, reso), 256, max_size, 64).resolutions == expected


def test_elided_rows_contain_the_named_buckets():
    assert set(NAMED_768_1280) <= set(BUCKETS_768_MAX_1280)
    assert set(NAMED_1024_2048) <= set(BUCKETS_1024_MAX_2048)


def _oracle_buckets(max_reso, min_size, max_size, d):
    """The formula of §E written independently (integer maths only, no shared helper)."""
    area = max_reso[0] * max_reso[1]
    out = {(math.isqrt(area) // d * d,) * 2}
    for w in range(min_size, max_size + 1, d):
        h = min(max_size, area // w // d * d)
        if h >= min_size:
            out |= {(w, h), (h, w)}
    return sorted(out)


@pytest.mark.parametrize("max_reso", [(512, 512), (640, 384), (768, 512), (896, 896), (1024, 768)])
@pytest.mark.parametrize(("min_size", "max_size", "d"), [(256, 1024, 64), (128, 2048, 32), (320, 960, 64)])
def test_bucket_sets_against_integer_oracle(max_reso, min_size, max_size, d):
    assert make_bucket_resolutions(max_reso, min_size, max_size, d) == _oracle_buckets(max_reso, min_size, max_size, d)


def test_degenerate_only_for_1024_with_max_1024():
    assert is_degenerate(BucketSettings((1024, 1024), 256, 1024, 64))
    assert not is_degenerate(BucketSettings((1024, 1024), 256, 2048, 64))
    assert not is_degenerate(BucketSettings((768, 768), 256, 1024, 64))
    assert not is_degenerate(BucketSettings((512, 512), 256, 1024, 64))
    assert not is_degenerate(BucketSettings((1024, 1024), 256, 1024, 64, no_upscale=True))


# --- assignments: (image) → (bucket, resized), every column of the reference table -------------------------------
SIZES = [(1920, 1080), (800, 600), (3000, 1000), (300, 200), (1024, 1536), (2048, 2048)]
TABLE = {
    ("512", 1024, False): [((640, 384), (683, 384)), ((576, 448), (597, 448)), ((832, 256), (832, 277)),
                           ((640, 384), (640, 427)), ((384, 640), (427, 640)), ((512, 512), (512, 512))],
    ("768", 1024, False): [((1024, 576), (1024, 576)), ((896, 640), (896, 672)), ((1024, 320), (1024, 341)),
                           ((896, 640), (960, 640)), ((640, 896), (640, 960)), ((768, 768), (768, 768))],
    ("1024", 1024, False): [((1024, 576), (1024, 576)), ((1024, 768), (1024, 768)), ((1024, 320), (1024, 341)),
                            ((1024, 704), (1056, 704)), ((704, 1024), (704, 1056)), ((1024, 1024), (1024, 1024))],
    ("1024", 2048, False): [((1344, 768), (1365, 768)), ((1152, 896), (1195, 896)), ((1728, 576), (1728, 576)),
                            ((1216, 832), (1248, 832)), ((832, 1216), (832, 1248)), ((1024, 1024), (1024, 1024))],
    ("512", 1024, True): [((640, 384), (683, 384)), ((512, 384), (512, 384)), ((768, 256), (768, 256)),
                          ((256, 192), (300, 200)), ((384, 576), (384, 576)), ((512, 512), (512, 512))],
    ("1024", 1024, True): [((1344, 768), (1365, 768)), ((768, 576), (800, 600)), ((1728, 576), (1728, 576)),
                           ((256, 192), (300, 200)), ((832, 1216), (832, 1248)), ((1024, 1024), (1024, 1024))],
}  # fmt: skip


@pytest.mark.parametrize("column", list(TABLE))
def test_assignment_table(column):
    reso, max_size, no_upscale = column
    settings = BucketSettings(parse_resolution(reso), 256, max_size, 64, no_upscale)
    got = [(a.bucket, a.resized) for a in (select_bucket(w, h, settings) for w, h in SIZES)]
    assert got == TABLE[column]


def test_contract_worked_cases_with_crops():
    s = BucketSettings()
    a = select_bucket(1920, 1080, s)
    assert (a.bucket, a.resized, a.crop) == ((640, 384), (683, 384), (21, 0, 661, 384))
    a = select_bucket(3000, 1000, s)
    assert (a.bucket, a.resized, a.crop) == ((832, 256), (832, 277), (0, 10, 832, 266))
    a = select_bucket(300, 200, s)
    assert (a.bucket, a.resized, a.crop) == ((640, 384), (640, 427), (0, 21, 640, 405))
    assert a.upscaled and a.scale == pytest.approx(640 / 300)
    a = select_bucket(1024, 1536, s)
    assert (a.bucket, a.resized, a.crop) == ((384, 640), (427, 640), (21, 0, 405, 640))
    assert not a.upscaled
    nu = BucketSettings(no_upscale=True)
    a = select_bucket(800, 600, nu)
    assert (a.bucket, a.resized, a.crop) == ((512, 384), (512, 384), (0, 0, 512, 384))
    a = select_bucket(300, 200, nu)
    assert (a.bucket, a.resized, a.crop, a.scale, a.upscaled) == ((256, 192), (300, 200), (22, 4, 278, 196), 1.0, False)


def test_aspect_error_is_bucket_minus_image():
    a = select_bucket(1920, 1080, BucketSettings())
    assert a.aspect_error == 640 / 384 - 1920 / 1080


def test_exact_bucket_size_is_kept():
    # 576×448 is a bucket: used as is, not upscaled, no crop.
    a = select_bucket(576, 448, BucketSettings())
    assert (a.bucket, a.resized, a.crop, a.upscaled, a.scale) == ((576, 448), (576, 448), (0, 0, 576, 448), False, 1.0)


@pytest.mark.parametrize(
    ("size", "first", "second"),
    [
        ((1550, 1050), (576, 448), (640, 384)),
        ((540, 160), (832, 256), (896, 256)),
        ((270, 910), (256, 832), (256, 896)),
    ],
)
def test_ties_go_to_the_first_bucket_in_sort_order(size, first, second):
    w, h = size
    ar = w / h
    # The two buckets really are at exactly the same float distance from the image's aspect.
    assert abs(first[0] / first[1] - ar) == abs(second[0] / second[1] - ar)
    assert select_bucket(w, h, BucketSettings()).bucket == first


def _kohya_oracle(w, h, resos, no_upscale, area, d):
    """A line-by-line port of kohya's BucketManager.select_bucket with numpy (its own argmin)."""
    ar = w / h
    if not no_upscale:
        reso = (w, h)
        if reso not in set(resos):
            errs = np.array([rw / rh for rw, rh in resos]) - ar
            reso = resos[int(np.abs(errs).argmin())]
        scale = reso[1] / h if ar > reso[0] / reso[1] else reso[0] / w
        return reso, (int(w * scale + 0.5), int(h * scale + 0.5))

    def r(x):
        x = int(x + 0.5)
        return x - x % d

    resized = (w, h)
    if w * h > area:
        rw = math.sqrt(area * ar)
        rh = area / rw
        bw = r(rw)
        arw = bw / r(bw / ar)
        bh = r(rh)
        arh = r(bh * ar) / bh
        resized = (bw, int(bw / ar + 0.5)) if abs(arw - ar) < abs(arh - ar) else (int(bh * ar + 0.5), bh)
    return (resized[0] - resized[0] % d, resized[1] - resized[1] % d), resized


@pytest.mark.parametrize("no_upscale", [False, True])
@pytest.mark.parametrize(("reso", "max_size"), [(512, 1024), (768, 1280), (1024, 2048)])
def test_random_sizes_match_the_numpy_port(no_upscale, reso, max_size):
    settings = BucketSettings((reso, reso), 256, max_size, 64, no_upscale)
    rng = random.Random(reso * 7 + no_upscale)
    sizes = [(rng.randint(200, 6000), rng.randint(200, 6000)) for _ in range(3000)]
    sizes += [(w * k, h * k) for (w, h) in settings.resolutions for k in (1, 2, 3)]  # exact and scaled buckets
    for w, h in sizes:
        a = select_bucket(w, h, settings)
        assert (a.bucket, a.resized) == _kohya_oracle(w, h, settings.resolutions, no_upscale, reso * reso, 64), (w, h)
        left, top, right, bottom = a.crop
        assert right - left == a.bucket[0] and bottom - top == a.bucket[1]
        assert 0 <= left <= a.resized[0] - a.bucket[0] and 0 <= top <= a.resized[1] - a.bucket[1]


def test_no_upscale_never_enlarges_and_stays_in_area():
    settings = BucketSettings((512, 512), no_upscale=True)
    rng = random.Random(3)
    for _ in range(2000):
        w, h = rng.randint(64, 5000), rng.randint(64, 5000)
        a = select_bucket(w, h, settings)
        assert not a.upscaled
        assert a.bucket[0] % 64 == 0 and a.bucket[1] % 64 == 0
        assert a.bucket[0] * a.bucket[1] <= 512 * 512


def test_no_upscale_too_small_is_an_error_not_a_crash():
    with pytest.raises(BucketError, match="under 64"):
        select_bucket(50, 300, BucketSettings(no_upscale=True))
    # Extreme aspect above the area: kohya divides by zero here.
    with pytest.raises(BucketError):
        select_bucket(20000, 20, BucketSettings(no_upscale=True))
    # Without no_upscale the same image is simply enlarged.
    assert select_bucket(50, 300, BucketSettings()).upscaled


def test_invalid_size():
    with pytest.raises(BucketError):
        select_bucket(0, 10, BucketSettings())


def test_round_to_steps_and_crop():
    assert round_to_steps(1365.33, 64) == 1344
    assert round_to_steps(767.5, 64) == 768
    assert round_to_steps(31.4, 64) == 0
    assert crop_ltrb((683, 384), (640, 384)) == (21, 0, 661, 384)
    assert crop_ltrb((640, 427), (640, 384)) == (0, 21, 640, 405)
    with pytest.raises(ValueError):
        crop_ltrb((10, 10), (64, 64))


def test_pixels_uses_the_same_crop():
    from sdtool.bucket import algorithm as buckets
    from sdtool.cache import pixels

    assert pixels.crop_ltrb is buckets.crop_ltrb


@pytest.mark.parametrize(
    ("text", "expected"), [("512", (512, 512)), ("768,512", (768, 512)), (" 640 , 384 ", (640, 384))]
)
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "512,512,512", "0", "-512", "512.5", "512x512"])
def test_parse_resolution_rejects(text):
    with pytest.raises(ValueError):
        parse_resolution(text)


def test_adjust_min_max_like_kohya_training():
    assert adjust_min_max_to_steps(256, 1024, 64) == (256, 1024)
    assert adjust_min_max_to_steps(300, 1000, 64) == (256, 1024)


def test_settings_record():
    s = BucketSettings((768, 512), 320, 1280, 64, True)
    assert s.max_area == 768 * 512
    assert s.as_dict() == {
        "resolution": [768, 512],
        "min_bucket_reso": 320,
        "max_bucket_reso": 1280,
        "bucket_reso_steps": 64,
        "bucket_no_upscale": True,
    }
