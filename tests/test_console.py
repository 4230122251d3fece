"""CONTRACT §B: skip reporting, strict mode, data on stdout."""

from __future__ import annotations

import io
import json

import pytest

from sdtool.console import NORMAL, Output, SkipReporter, set_verbosity
from sdtool.errors import StrictModeError


@pytest.fixture(autouse=True)
def normal_verbosity():
    # In-process CLI tests (`-q`) leave the module-level verbosity behind in the same worker.
    set_verbosity(NORMAL)


def test_output_plain_and_json():
    buf = io.StringIO()
    out = Output(json_lines=False, stream=buf)
    out.path("/x/a.png")
    out.record({"ignored": True})
    assert buf.getvalue() == "/x/a.png\n"
    buf = io.StringIO()
    out = Output(json_lines=True, stream=buf)
    out.path("/x/a.png")
    out.record({"path": "/x/ä.png", "size": (1, 2)})
    assert json.loads(buf.getvalue()) == {"path": "/x/ä.png", "size": [1, 2]}


def test_skip_reporter_strict(capsys):
    rep = SkipReporter(strict=True)
    rep.ok(3)
    rep.skip("/d/bad.png", "empty file")
    with pytest.raises(StrictModeError):
        rep.finish()
    err = capsys.readouterr().err
    assert "skipped /d/bad.png: empty file" in err
    assert "processed 3 images, skipped 1" in err


def test_skip_reporter_not_strict():
    rep = SkipReporter(strict=False)
    rep.skip("/d/bad.png", "empty file")
    rep.finish()
    assert rep.skipped == [("/d/bad.png", "empty file")]


def test_counts_read_as_a_person_writes_them():
    from sdtool.console import plural

    assert plural(1, "epoch") == "1 epoch" and plural(2, "epoch") == "2 epochs" and plural(0, "image") == "0 images"
    assert plural(1, "batch", "batches") == "1 batch" and plural(3, "batch", "batches") == "3 batches"


def test_progress_in_a_log_is_a_line_at_the_start_at_each_interval_and_at_the_end(capsys, monkeypatch):
    from sdtool import console

    clock = iter([0.0, 0.0, 1.0, 2.0, 31.0, 32.0, 40.0, 40.0])  # started, then one reading per update / close
    monkeypatch.setattr(console, "_now", lambda: next(clock))
    monkeypatch.delenv(console.PROGRESS_EVERY_ENV, raising=False)
    progress = console.LineProgress("cache", 6)
    for _ in range(5):
        progress.update(advance=1)  # t = 0, 1, 2, 31, 32
    progress.update(advance=1)  # t = 40: the end
    progress.close()  # already said: no second line
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["cache: 1/6 images", "cache: 4/6 images", "cache: 6/6 images"]
    assert "eta 0:00:16" in lines[1]  # 3 images in 31 s: 3 more take about 16 s
    assert "eta" not in lines[2] and "elapsed 0:00:40" in lines[2]


def test_progress_lines_follow_the_interval_setting_and_stay_quiet_with_q(capsys, monkeypatch):
    from sdtool import console

    monkeypatch.setenv(console.PROGRESS_EVERY_ENV, "0")
    with console.progress_bar("tag", 3) as advance:  # stderr is captured, not a terminal: lines, not a bar
        for _ in range(3):
            advance(1)
    assert capsys.readouterr().err.count("tag: ") == 3
    console.set_verbosity(console.QUIET)
    with console.progress_bar("tag", 3) as advance:
        advance(3)
    assert capsys.readouterr().err == ""
