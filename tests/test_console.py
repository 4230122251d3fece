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
