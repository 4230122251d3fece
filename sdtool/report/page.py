"""The run report as one self-contained HTML page: inline CSS, the curves as inline SVG, sample images as data
URIs, no script and a Content-Security-Policy that forbids loading anything, so the page shows the same offline, in
a mail attachment or on a colleague's machine. Links to the full-size samples work beside the output folder.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from sdtool.report.collect import RunData, SamplePoint, primary_loss

MAX_POINTS = 40  # sampling points shown side by side; longer runs show an even selection with the first and last
THUMBNAIL = 320  # longest side of a sample in the page, in pixels (full size one click away)

_CSS = """
:root { color-scheme: light; --fg: #1d2330; --muted: #5b6578; --line: #d9dee7; --accent: #1f4e9a; --best: #fff3cd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; }
.sub { color: var(--muted); margin: 0 0 16px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 18px; margin: 16px 0; }
section > h2:first-child { margin-top: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; background: #fbfcfd; }
.card .k { color: var(--muted); font-size: 12px; } .card .v { font-size: 17px; font-weight: 600; }
.curves svg { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f0f2f6; position: sticky; top: 0; } td.l, th.l { text-align: left; }
tr.best td { background: var(--best); }
.samples td, .samples th { text-align: center; vertical-align: top; }
.samples td.prompt { text-align: left; white-space: normal; min-width: 160px; max-width: 240px; font-size: 12px; }
.samples img { display: block; max-width: none; border-radius: 3px; }
pre { background: #f3f5f8; border: 1px solid var(--line); border-radius: 6px; padding: 10px; overflow-x: auto;
      font-size: 12px; }
.note { color: var(--muted); } .warn { color: #8a5a00; }
"""


def page(data: RunData, curves_svg: str | None, curves_note: str | None, written: str, version: str) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may load from anywhere: the page is whole as it is.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(data.name)} · sdtool run report</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{escape(data.name)}</h1>",
        f'<p class="sub">sdtool {escape(version)} run report of <code>{escape(str(data.folder))}</code>, '
        f"written {escape(written)}</p>",
        _summary(data),
        _curves(curves_svg, curves_note),
        _validation_table(data),
        _samples(data),
        _plan(data),
        _config(data),
        _files(data),
    ]
    if data.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in data.problems)
        parts.append(f'<section><h2>Not read</h2><ul class="warn">{items}</ul></section>')
    parts.append("</main></body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="k">{escape(key)}</div><div class="v">{escape(value)}</div></div>'


def _summary(data: RunData) -> str:
    plan = data.run.get("plan", {})
    cards = []
    if data.steps:
        last = data.steps[-1]
        total = plan.get("total_steps")
        cards.append(_card("steps", f"{last['step']}" + (f" of {total}" if total else "")))
        cards.append(_card("epoch", str(last.get("epoch", "?"))))
        tail = [float(s["loss"]) for s in data.steps[-max(1, len(data.steps) // 10) :]]
        cards.append(_card("training loss (last 10 %)", f"{sum(tail) / len(tail):.4f}"))
        seconds = sum(float(s.get("seconds", 0)) for s in data.steps)
        cards.append(_card("training time", _duration(seconds)))
    best = data.best
    if best is not None:
        cards.append(_card("best validation loss", f"{primary_loss(best):.4f} @ step {best['step']}"))
        last_val = primary_loss(data.validations[-1])
        if last_val is not None:
            cards.append(_card("last validation loss", f"{last_val:.4f} @ step {data.validations[-1]['step']}"))
    if plan:
        val = plan.get("validation", {}).get("images", [])
        cards.append(_card("images", f"{plan.get('images', '?')} train" + (f", {len(val)} validation" if val else "")))
    if not cards:
        return '<section><h2>Summary</h2><p class="note">No step has finished yet.</p></section>'
    return f'<section><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>'


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _curves(svg: str | None, note: str | None) -> str:
    body = svg if svg is not None else f'<p class="warn">{escape(note or "no curves")}</p>'
    return f'<section class="curves"><h2>Curves</h2>{body}</section>'


def _validation_table(data: RunData) -> str:
    if not data.validations:
        return ""
    bands = sorted({int(t) for v in data.validations for t in (v.get("val_loss_by_t") or {})})
    has_raw = any("val_loss_raw" in v for v in data.validations)
    head = ["step", "epoch", "val_loss"] + (["val_loss_raw"] if has_raw else []) + [f"t = {t}" for t in bands]
    best = data.best
    rows = []
    for v in data.validations:
        by_t = v.get("val_loss_by_t") or v.get("val_loss_raw_by_t") or {}
        cells = [str(v["step"]), str(v.get("epoch", "")), _num(v.get("val_loss"))]
        cells += [_num(v.get("val_loss_raw"))] if has_raw else []
        cells += [_num(by_t.get(str(t))) for t in bands]
        cls = ' class="best"' if v is best else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    images = data.validations[-1].get("val_images")
    note = f"{images} held-out images, each at every timestep with fixed noise; " if images else ""
    return (
        '<section><h2>Validation</h2><p class="note">'
        f"{note}the highlighted row has the lowest loss.</p>"
        f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        "</section>"
    )


def _num(value: Any) -> str:
    return f"{value:.5f}" if isinstance(value, int | float) else "–"


def chosen_points(points: list[SamplePoint], limit: int = MAX_POINTS) -> list[SamplePoint]:
    """At most `limit` sampling points, evenly spread, always with the first and the last."""
    if len(points) <= limit:
        return points
    picks = sorted({round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picks]


def _samples(data: RunData) -> str:
    points = [p for p in data.samples if p.images or p.grid is not None]
    if not points:
        return ""
    shown = chosen_points(points)
    rows_n = max(len(p.images) for p in shown) or 1
    header = '<th class="l">prompt</th>' + "".join(f"<th>{escape(p.label)}</th>" for p in shown)
    rows = []
    for r in range(rows_n):
        prompt = next((p.prompts[r] for p in reversed(shown) if r < len(p.prompts) and p.prompts[r]), "")
        cells = [f'<td class="prompt">{escape(prompt)}</td>']
        for p in shown:
            path = p.images[r] if r < len(p.images) else (p.grid if r == 0 and not p.images else None)
            cells.append(f"<td>{_image_cell(path, data.folder)}</td>" if path is not None else "<td></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f"{len(shown)} of {len(points)} sampling points (evenly spread). " if len(shown) < len(points) else ""
    return (
        '<section><h2>Samples</h2><p class="note">'
        f"{note}Each column is a sampling point, each row a prompt; click an image for the full-size file.</p>"
        f'<div class="scroll"><table class="samples"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _image_cell(path: Path, folder: Path) -> str:
    uri, (w, h) = thumbnail(path)
    try:
        href = path.relative_to(folder).as_posix()
    except ValueError:
        href = path.as_uri()
    return (
        f'<a href="{escape(href)}"><img src="{uri}" width="{w}" height="{h}" alt="{escape(path.name)}" '
        f'title="{escape(path.name)}"></a>'
    )


def thumbnail(path: Path, size: int = THUMBNAIL) -> tuple[str, tuple[int, int]]:
    """A data URI of the image scaled to fit `size` (never up): PNG for small images, JPEG for large ones."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small = rgb.width * rgb.height <= 256 * 256
    rgb.save(buf, format="PNG" if small else "JPEG", quality=88)
    mime = "image/png" if small else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}", rgb.size


def _plan(data: RunData) -> str:
    plan = data.run.get("plan")
    if not isinstance(plan, dict):
        return ""
    head = ["dataset", "bucket", "images", "with repeats", "global batch", "batches/epoch"]
    rows = []
    for b in plan.get("buckets", []):
        cells = [b.get("dataset"), "x".join(map(str, b.get("bucket", []))), b.get("images"), b.get("with_repeats")]
        cells += [b.get("global_batch"), b.get("batches_per_epoch")]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    counts = (
        f"{plan.get('images')} training images, {plan.get('processes')} process(es), gradient accumulation "
        f"{plan.get('gradient_accumulation_steps')}: {plan.get('steps_per_epoch')} steps per epoch, "
        f"{plan.get('total_steps')} steps ({plan.get('epochs')} epochs), seed {plan.get('seed')}"
    )
    validation = plan.get("validation") or {}
    held = ""
    if validation.get("images"):
        splits = "".join(
            f"<li>dataset {escape(str(s.get('dataset')))}, <code>{escape(str(s.get('metadata_file')))}</code>: "
            f"{escape(str(s.get('held')))} of {escape(str(s.get('images')))} ({escape(str(s.get('how')))})</li>"
            for s in validation.get("splits", [])
        )
        names = "".join(f"<li><code>{escape(str(p))}</code></li>" for p in validation["images"])
        held = (
            f"<p>Validation: {len(validation['images'])} images held out of training.</p><ul>{splits}</ul>"
            f"<details><summary>the held-out images</summary><ul>{names}</ul></details>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return (
        f"<section><h2>Bucket plan</h2><p>{escape(counts)}</p>"
        f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        f"{held}</section>"
    )


def _config(data: RunData) -> str:
    config = data.run.get("config")
    if not isinstance(config, str):
        return ""
    source = data.run.get("config_file")
    where = f" (from <code>{escape(str(source))}</code>)" if source else ""
    return f"<section><h2>Config</h2><p>The resolved config{where}:</p><pre>{escape(config)}</pre></section>"


def _files(data: RunData) -> str:
    if not data.models and not data.states:
        return ""
    items = [f"<li><code>{escape(p.name)}</code>{_best_note(p, data)}</li>" for p in data.models]
    items += [f"<li><code>{escape(p.name)}/</code> (state, for resume)</li>" for p in data.states]
    return f"<section><h2>Files</h2><ul>{''.join(items)}</ul></section>"


def _best_note(path: Path, data: RunData) -> str:
    stem = path.name.split(".")[0]
    if stem.endswith("-best") and data.best is not None:
        return f" — lowest validation loss ({primary_loss(data.best):.4f} at step {data.best['step']})"
    return ""
