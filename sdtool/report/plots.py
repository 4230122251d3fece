"""The run report's curves, drawn with matplotlib: training loss (raw and smoothed), validation loss (mean, the
trained weights' beside the EMA's, and per timestep) and the learning rate, sharing the step axis.

One figure is rendered twice: as SVG for the HTML page (text drawn as paths, so the page needs no fonts) and as PNG
for terminals and chat windows. matplotlib is imported here only, never by the CLI at start-up; without it the
report is written with a notice in place of the curves (`MissingDependencyError`).
"""

from __future__ import annotations

import io
import math
from typing import Any

from sdtool.errors import MissingDependencyError
from sdtool.report.collect import RunData, primary_loss

_MAX_POINTS = 2000  # training steps drawn one by one; longer runs are drawn as a mean line in a min–max band
_COLORS = {"train": "#9aa9bf", "smooth": "#1f4e9a", "val": "#d1495b", "raw": "#edae49", "lr": "#2e8540"}


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "drawing the report's curves") from exc
    return matplotlib


def smoothed(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard's smoothing (a debiased exponential moving average); the weight grows with the run's length."""
    if weight is None:
        weight = min(0.95, 1 - 10 / max(len(values), 10))
    out, last, norm = [], 0.0, 0.0
    for value in values:
        last = last * weight + (1 - weight) * value
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return out


def curves_figure(data: RunData) -> Any | None:
    """The figure (loss, validation by timestep when there is validation, learning rate), or None without data."""
    if not data.steps and not data.validations:
        return None
    matplotlib = _matplotlib()
    from matplotlib.figure import Figure

    by_t = [v for v in data.validations if isinstance(v.get("val_loss_by_t"), dict)]
    lrs = [s for s in data.steps if isinstance(s.get("lr"), dict)]
    panels = ["loss"] + (["by_t"] if by_t else []) + (["lr"] if lrs else [])
    heights = {"loss": 3.2, "by_t": 2.4, "lr": 1.8}
    with matplotlib.rc_context({"svg.hashsalt": "sdtool-report", "font.size": 9, "axes.titlesize": 10}):
        fig = Figure(figsize=(10, sum(heights[p] for p in panels)), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, height_ratios=[heights[p] for p in panels], squeeze=False)
        for panel, ax in zip(panels, axes[:, 0], strict=True):
            {"loss": _loss_panel, "by_t": _by_t_panel, "lr": _lr_panel}[panel](ax, data)
            ax.grid(True, alpha=0.25)
        axes[-1, 0].set_xlabel("optimizer step")
    return fig


def _loss_panel(ax: Any, data: RunData) -> None:
    steps = [s["step"] for s in data.steps]
    losses = [float(s["loss"]) for s in data.steps]
    if steps:
        if len(steps) <= _MAX_POINTS:
            ax.plot(steps, losses, color=_COLORS["train"], linewidth=0.8, label="training loss")
        else:
            xs, lo, mean, hi = _binned(steps, losses, _MAX_POINTS // 2)
            ax.fill_between(
                xs, lo, hi, color=_COLORS["train"], alpha=0.35, linewidth=0, label="training loss (min–max)"
            )
            ax.plot(xs, mean, color=_COLORS["train"], linewidth=0.8)
        ax.plot(steps, smoothed(losses), color=_COLORS["smooth"], linewidth=1.8, label="training loss, smoothed")
    for key, color, label in (
        ("val_loss", _COLORS["val"], "validation loss"),
        ("val_loss_raw", _COLORS["raw"], "validation loss, trained weights (EMA run)"),
    ):
        points = [(v["step"], v[key]) for v in data.validations if isinstance(v.get(key), int | float)]
        if points:
            val_x, val_y = zip(*points, strict=True)
            style = "--" if key == "val_loss_raw" else "-"
            ax.plot(val_x, val_y, style, color=color, linewidth=1.8, marker="o", markersize=3.5, label=label)
    best = data.best
    if best is not None:
        value = primary_loss(best)
        ax.plot(
            [best["step"]],
            [value],
            marker="*",
            markersize=13,
            color=_COLORS["val"],
            linestyle="none",
            markeredgecolor="black",
            markeredgewidth=0.6,
            label=f"best validation {value:.4f} @ step {best['step']}",
        )
    ax.set_title("loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)


def _by_t_panel(ax: Any, data: RunData) -> None:
    import matplotlib

    records = [v for v in data.validations if isinstance(v.get("val_loss_by_t"), dict)]
    bands = sorted({int(t) for v in records for t in v["val_loss_by_t"]})
    colormap = matplotlib.colormaps["viridis"]
    for i, t in enumerate(bands):
        points = [(v["step"], v["val_loss_by_t"].get(str(t))) for v in records]
        points = [(x, y) for x, y in points if isinstance(y, int | float)]
        if points:
            xs, ys = zip(*points, strict=True)
            color = colormap(i / max(len(bands) - 1, 1) * 0.9)
            ax.plot(xs, ys, color=color, linewidth=1.4, marker="o", markersize=2.5, label=f"t = {t}")
    ax.set_title("validation loss per timestep (low t: fine detail, high t: composition)")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8, ncols=min(len(bands), 6), framealpha=0.85)


def _lr_panel(ax: Any, data: RunData) -> None:
    groups: dict[str, list[tuple[int, float]]] = {}
    for s in data.steps:
        for name, value in (s.get("lr") or {}).items():
            if isinstance(value, int | float):
                groups.setdefault(name, []).append((s["step"], float(value)))
    shown = list(groups.items())[:12]  # per-block rates can be two dozen groups
    for name, points in shown:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, linewidth=1.2, label=name)
    ax.set_title("learning rate" + (f" ({len(shown)} of {len(groups)} groups)" if len(groups) > len(shown) else ""))
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(shown) > 1:
        ax.legend(loc="upper right", fontsize=8, ncols=min(len(shown), 4), framealpha=0.85)


def _binned(xs: list[int], ys: list[float], bins: int) -> tuple[list[float], list[float], list[float], list[float]]:
    size = math.ceil(len(xs) / bins)
    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    for i in range(0, len(xs), size):
        chunk = ys[i : i + size]
        out[0].append(sum(xs[i : i + size]) / len(chunk))
        out[1].append(min(chunk))
        out[2].append(sum(chunk) / len(chunk))
        out[3].append(max(chunk))
    return out


def render(fig: Any, fmt: str) -> bytes:
    """The figure as SVG (text as paths, no date) or PNG."""
    matplotlib = _matplotlib()
    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "sdtool-report", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, dpi=110, metadata=metadata)
    return buf.getvalue()
