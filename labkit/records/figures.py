"""Static figures fit for a class: heatmaps with labelled axes, token tick labels and a colour bar with its unit.

Drawn with matplotlib's Agg backend (offline, no pyplot state: a figure belongs to its :class:`Picture`, never to a
global figure manager). A :class:`Picture` shows as a PNG wherever a notebook is rendered (JupyterLab, nbconvert,
GitHub), ``png()`` gives the bytes an ``ipywidgets.Image`` takes and ``save(path)`` writes atomically. DejaVu Sans,
matplotlib's bundled font, covers ×, →, ², ‖ and ␣, so titles never show empty boxes.

:class:`Chart` is a plotly figure that stays interactive in JupyterLab and carries a PNG of the same data for static
exports, where plotly's JavaScript does not run.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from labkit.core.errors import InvalidArgument
from labkit.core.files import atomic_path

DPI = 100  #: dots per inch of every static figure
MIN_WIDTH_IN, MIN_HEIGHT_IN = 5.0, 3.6
"""The smallest figure drawn (inches at :data:`DPI`): 500 × 360 px, so 9-pt tick labels stay legible."""
MAX_TICK_LABELS = 64
"""Token tick labels are drawn up to this many per axis; longer axes get numbered ticks."""


DIVERGING = {"RdBu", "coolwarm", "bwr", "seismic", "PiYG", "PRGn", "BrBG", "PuOr", "RdGy", "RdYlBu", "RdYlGn",
             "Spectral"}
"""Colour maps with a neutral middle, for signed values (each also reversed, ``_r``)."""
STRICT_ENV = "LABKIT_FIGURE_RULES"
"""Set to ``error`` (the notebook tests do) and drawing a figure that breaks a rule (:func:`problems`) raises."""


class Picture:
    """One static figure. ``figure`` is the matplotlib Figure (its axes, labels and colour bar are inspectable)."""

    def __init__(self, figure: Figure) -> None:
        self.figure = figure
        FigureCanvasAgg(figure)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        w, h = self.figure.get_size_inches() * self.figure.dpi
        return round(w), round(h)

    @property
    def title(self) -> str:
        """The figure's title (its suptitle, else the first axes title; empty when none)."""
        return self.figure.get_suptitle() or next((ax.get_title() for ax in self.figure.axes if ax.get_title()), "")

    def png(self) -> bytes:
        """The figure as PNG bytes, at the figure's own DPI."""
        if os.environ.get(STRICT_ENV) == "error" and (broken := problems(self)):
            raise InvalidArgument(f"the figure {self.title!r} breaks the figure rules: {'; '.join(broken)}")
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=self.figure.dpi)
        return buf.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png()

    def save(self, path: Any) -> Any:
        """Write the figure (format from the suffix: .png, .svg, .pdf) atomically; returns the path."""
        from pathlib import Path

        target = Path(path)
        with atomic_path(target) as tmp:
            self.figure.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=self.figure.dpi)
        return target

    def __repr__(self) -> str:
        w, h = self.size
        return f"<Picture {self.title!r}: {w}×{h} px>"


def problems(picture: Picture) -> list[str]:
    """The figure rules ``picture`` breaks (empty when none): every plot's axes labelled, every colour bar labelled
    (its unit), numeric tick labels unquoted, signed values (an image with cells below and above 0) on a diverging
    colour map centred on 0, points (markers without lines) labelled by text or a legend, and no text running off
    the figure. What a test cannot see — whether a colour map suits the reader, whether labels say enough — is left
    to the eye."""
    fig = picture.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is not None:
            if not (ax.get_ylabel() or ax.get_xlabel()):
                found.append("a colour bar without a label (say its unit)")
            continue
        if not ax.axison:
            continue  # an image shown as itself, without axes
        spec = ax.get_subplotspec()  # in a grid of panels, the outer ones carry the labels
        for axis, label, outer in (("x", ax.get_xlabel(), spec is None or spec.is_last_row()),
                                   ("y", ax.get_ylabel(), spec is None or spec.is_first_col())):
            ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
            if len(ticks) and outer and not label:
                found.append(f"the {axis} axis has no label")
        for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            if re.fullmatch(r"'[-+]?\d+(\.\d+)?'", tick.get_text()):
                found.append(f"a numeric tick label is quoted: {tick.get_text()}")
                break
        for image in ax.get_images():
            data = np.ma.masked_invalid(np.ma.asarray(image.get_array(), float)).compressed()
            if data.size and data.min() < 0 < data.max():
                name = image.get_cmap().name.removesuffix("_r")
                low, high = image.get_clim()
                if name not in DIVERGING:
                    found.append(f"signed values on the one-directional colour map {image.get_cmap().name!r}")
                elif abs(low + high) > 1e-6 * max(abs(low), abs(high)):
                    found.append(f"a diverging colour map not centred on 0 (limits {low:.3g}, {high:.3g})")
        points = [ln for ln in ax.get_lines() if ln.get_linestyle() == "None" and ln.get_marker() not in ("None", "")]
        if points and not ax.texts and ax.get_legend() is None:
            found.append("points without labels (text beside them, or a legend)")
    box = fig.bbox  # what is drawn (ticks outside an axis's range are not) must lie inside the figure
    drawn = [(ax.get_title() or ax.get_ylabel() or "a plot", ax.get_tightbbox(renderer)) for ax in fig.axes]
    drawn += [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_visible() and t.get_text()]
    for name, extent in drawn:
        if extent is not None and (extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1 or extent.y0 < box.y0 - 1
                                   or extent.y1 > box.y1 + 1):
            found.append(f"{name[:40]!r}: something runs off the figure")
    return found


def token_label(text: str, width: int = 16) -> str:
    """A token as a tick label: quoted so a leading space shows (``' Paris'``), control characters escaped, cut
    to ``width`` characters with an ellipsis."""
    shown = repr(text)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def _as_2d(matrix: torch.Tensor | np.ndarray, name: str = "matrix") -> np.ndarray:
    a = matrix.detach().float().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if a.ndim != 2 or a.size == 0:
        raise InvalidArgument(f"{name} must be a non-empty 2-D array; got shape {a.shape}")
    return a


def _check_labels(name: str, labels: Sequence[Any] | None, n: int) -> list[Any] | None:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n:
        raise InvalidArgument(f"{name} must have one entry per {'column' if name.startswith('x') else 'row'} ({n}); "
                              f"got {len(labels)}")
    return labels


def _ticks(ax: Any, axis: str, n: int, labels: list[str] | None, tokens: bool) -> None:
    """Integer ticks on ``axis``; label texts (tokens quoted) when there are few enough to read."""
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if labels is not None and n <= MAX_TICK_LABELS:
        texts = tokens and any(isinstance(t, str) for t in labels)  # numbers (layers, heads) are drawn unquoted
        shown = [token_label(t) if texts and isinstance(t, str) else str(t) for t in labels]
        set_ticks(range(n), shown, fontsize=9 if n <= 24 else 7, rotation=90 if axis == "x" and texts else 0)
    else:
        step = max(1, math.ceil(n / 12))
        set_ticks(range(0, n, step))


def _new_figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(max(width_in, MIN_WIDTH_IN), max(height_in, MIN_HEIGHT_IN)), dpi=DPI,
                  layout="constrained")


def heatmap(matrix: torch.Tensor | np.ndarray, labels: Sequence[str] | None = None, size: int = 512,
            vmin: float | None = None, vmax: float | None = None, title: str | None = None, *,
            x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
            xlabel: str = "key position", ylabel: str = "query position", colorbar: str = "attention probability",
            tokens: bool = True, cmap: str | None = None) -> Picture:
    """Shape (R, C) -> a heatmap about ``size`` px wide (never under 500 × 360 px) with both axes labelled, a colour
    bar titled ``colorbar`` (say the unit) and, when given, tick labels: ``labels`` for a square matrix (rows and
    columns are the same tokens), or ``x_labels`` (C) and ``y_labels`` (R). ``tokens`` quotes string labels as
    tokens (a leading space shows); numbers (layer, head) are drawn as they are.
    Colours: values that are all ≥ 0 on ``viridis`` from 0 (``vmin``) to their maximum (``vmax``); signed values
    (some < 0, some > 0) on the diverging ``RdBu_r`` centred on 0 (limits ± the largest magnitude), so a negative
    cell never looks like a zero one. ``cmap``, ``vmin`` and ``vmax`` override. NaN and −inf cells are left blank
    (white)."""
    a = _as_2d(matrix)
    cmap, vmin, vmax = _colours(a, cmap, vmin, vmax)
    rows, cols = a.shape
    if labels is not None:
        if rows != cols:
            raise InvalidArgument(f"labels is for a square matrix; got shape {a.shape}: pass x_labels and y_labels")
        labels = _check_labels("labels", labels, rows)
        x_labels = y_labels = labels
    x_labels, y_labels = _check_labels("x_labels", x_labels, cols), _check_labels("y_labels", y_labels, rows)
    if not isinstance(size, int) or size < 100:
        raise InvalidArgument(f"size must be an integer number of pixels ≥ 100; got {size!r}")
    width_in = size / DPI + 1.6  # the colour bar and the row labels take about 1.6 in
    fig = _new_figure(width_in, min(width_in * rows / cols * 0.85, 1.3 * width_in) + 0.9)  # cells may be oblong
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(a)
    image = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    _ticks(ax, "x", cols, x_labels, tokens)
    _ticks(ax, "y", rows, y_labels, tokens)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11, wrap=True)
    fig.colorbar(image, ax=ax, label=colorbar, shrink=0.9)
    return Picture(fig)


def overlay(picture: Any, grid: torch.Tensor | np.ndarray, colorbar: str, title: str | None = None,
            alpha: float = 0.55, size: int = 420) -> Picture:
    """A (rows, cols) grid of values drawn over ``picture`` (a PIL image), each cell stretched over its part of the
    image (the feature grid spans the whole picture), with pixel axes and a colour bar titled ``colorbar`` (say the
    unit). NaN cells are left clear."""
    a = _as_2d(grid)
    image = np.asarray(picture.convert("RGB"))
    h, w = image.shape[:2]
    cmap, vmin, vmax = _colours(a, None, None, None)
    width_in = size / DPI + 1.6
    fig = _new_figure(width_in, width_in * h / w * 0.85 + 0.9)
    ax = fig.add_subplot()
    grey = image @ np.array([0.299, 0.587, 0.114])  # luminance: grey, so that the overlay's colours read true
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
    shown = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, extent=(0, w, h, 0),
                      interpolation="nearest")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    if title:
        ax.set_title(title, fontsize=10, wrap=True)
    fig.colorbar(shown, ax=ax, label=colorbar, shrink=0.9)
    return Picture(fig)


def _colours(a: np.ndarray, cmap: str | None, vmin: float | None,
             vmax: float | None) -> tuple[str, float | None, float | None]:
    """The colour map and limits for values ``a``: diverging and centred for signed values, else viridis from 0."""
    finite = a[np.isfinite(a)]
    signed = finite.size > 0 and finite.min() < 0 < finite.max()
    if signed and cmap is None and vmin is None and vmax is None:
        peak = float(np.abs(finite).max())
        return "RdBu_r", -peak, peak
    return cmap or "viridis", (0.0 if vmin is None and not signed else vmin), vmax


def head_grid(maps: torch.Tensor, cols: int | None = None, cell_size: int = 160, titles: list[str] | None = None,
              title: str | None = None, colorbar: str = "attention probability") -> Picture:
    """Shape (N, T, T) -> a grid of N small heatmaps (e.g. every head of one layer) on one shared 0–1 colour scale,
    each titled (``titles``, default "head i"), with key/query axis labels on the outer panels and one colour bar."""
    if maps.ndim != 3:
        raise InvalidArgument(f"maps must have shape (N, T, T); got {tuple(maps.shape)}")
    n = maps.shape[0]
    if titles is not None and len(titles) != n:
        raise InvalidArgument(f"titles must have one entry per map ({n}); got {len(titles)}")
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell_in = max(cell_size, 100) / DPI
    fig = _new_figure(cols * cell_in + 1.2, rows * (cell_in + 0.3) + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        image = ax.imshow(_as_2d(maps[i], "maps[i]"), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(titles[i] if titles else f"head {i}", fontsize=9)
        ax.tick_params(labelsize=7)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        if i % cols == 0:
            ax.set_ylabel("query", fontsize=8)
        if i >= n - cols:
            ax.set_xlabel("key", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11, wrap=True)
    fig.colorbar(image, ax=axes, label=colorbar, shrink=0.8)
    return Picture(fig)


def layer_head_summary(values: torch.Tensor, size: int = 480, title: str | None = None,
                       colorbar: str = "value", vmin: float | None = None, vmax: float | None = None,
                       cmap: str | None = None) -> Picture:
    """Shape (L, H) -> one cell per (layer, head): rows are layers, columns heads, ``colorbar`` names the quantity
    and its unit (e.g. "mean attention entropy (bits)")."""
    if values.ndim != 2:
        raise InvalidArgument(f"values must have shape (L, H); got {tuple(values.shape)}")
    layers, heads = values.shape
    return heatmap(values, size=size, vmin=vmin, vmax=vmax, title=title, xlabel="head", ylabel="layer",
                   x_labels=list(range(heads)), y_labels=list(range(layers)),
                   colorbar=colorbar, tokens=False, cmap=cmap)


def grouped_bars(series: dict[str, Sequence[float]], x_labels: Sequence[Any], xlabel: str, ylabel: str,
                 title: str | None = None, width: int = 640) -> Picture:
    """Bars side by side: one group per x label, one bar per series (``{name: values}``, each as long as
    ``x_labels``), a legend, labelled axes (say the unit in ``ylabel``) and a line at 0."""
    if not series:
        raise InvalidArgument("series must name at least one list of values")
    n = len(x_labels)
    for name, values in series.items():
        if len(values) != n:
            raise InvalidArgument(f"series {name!r} has {len(values)} values; x_labels has {n}")
    fig = _new_figure(width / DPI, 3.4)
    ax = fig.add_subplot()
    step = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(n) - 0.4 + step * (k + 0.5), list(values), width=step, label=name)
    ax.axhline(0.0, color="#444", linewidth=0.8)
    ax.set_xticks(np.arange(n), [str(v) for v in x_labels], fontsize=7 if n > 16 else 9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=11, wrap=True)
    return Picture(fig)


def beam_tree_picture(tree: Any, title: str = "Beam search tree") -> Picture:
    """A :class:`~labkit.records.beam_tree.BeamTree` as a Picture: x the step, y the candidate's rank among that
    step's kept
    candidates (0 = best score); each node joined to its parent; the returned path red and labelled, finished
    hypotheses green (labelled with their length-normalised score), expanded beams blue, pruned ones grey."""
    colours = {"returned": "#d62728", "finished": "#2ca02c", "expanded": "#1f77b4", "pruned": "#b0b0b0"}
    by_step: dict[int, list[Any]] = {}
    for node in tree.nodes:
        by_step.setdefault(node.step, []).append(node)
    place = {n.id: (step, rank) for step, nodes in by_step.items()
             for rank, n in enumerate(sorted(nodes, key=lambda n: -n.score))}
    on_path = {n.id for n in tree.path()} if tree.returned >= 0 else set()
    steps = max(by_step, default=0) + 1
    width = max(6.4, 0.55 * steps + 2.6)  # inches: the legend sits to the right
    height = max(3.8, 0.32 * max((len(v) for v in by_step.values()), default=1) + 1.2)
    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    for node in tree.nodes:
        x, y = place[node.id]
        if node.parent >= 0:
            px, py = place[node.parent]
            path = node.id in on_path
            ax.plot([px, x], [py, y], color=colours["returned"] if path else "#cccccc", lw=2.2 if path else 0.7,
                    zorder=2 if path else 1)
        status = "returned" if node.id in on_path else node.status
        ax.scatter([x], [y], s=36 if node.id in on_path else 14, color=colours[status], zorder=3)
        if node.id in on_path or status == "finished":
            label = token_label(node.token, 10)
            if status == "finished" and node.final_score is not None:
                label += f" ({node.final_score:.2f})"
            ax.annotate(label, (x, y), xytext=(3, 4), textcoords="offset points", fontsize=7,
                        color=colours[status])
    for status, colour in colours.items():
        ax.scatter([], [], color=colour, s=18, label=status)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)  # beside, never on, nodes
    ax.set_xlim(-0.5, steps - 0.5 + 1.2)  # room on the right for the last labels
    ax.set_xlabel("step (generated token)")
    ax.set_ylabel("rank among the kept candidates (0 = best score)")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=11, wrap=True)
    return Picture(fig)


def to_png(image: Any) -> bytes:
    """PNG bytes of a :class:`Picture` or a PIL image (what ``ipywidgets.Image(value=...)`` takes)."""
    if isinstance(image, Picture):
        return image.png()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- plotly with a static fallback ------------------------------------------------------------------------------

def _text(title: Any) -> str:
    return (getattr(title, "text", None) or "") if title is not None else ""


def _tiers(trace: Any) -> list[int]:
    """For each point of a scatter trace, the tier of its label above the point: one above the highest tier among
    earlier points within 15 % of the x span and 6 % of the y span (a label is wide, a point is not), so labels of
    points that (nearly) coincide are stacked instead of printed over each other."""
    xs, ys = np.asarray(trace.x, float), np.asarray(trace.y, float)
    sx, sy = (np.ptp(xs) or 1.0) * 0.15, (np.ptp(ys) or 1.0) * 0.06
    tiers: list[int] = []
    for i in range(len(xs)):
        near = [tiers[j] for j in range(i) if abs(xs[j] - xs[i]) <= sx and abs(ys[j] - ys[i]) <= sy]
        tiers.append(max(near) + 1 if near else 0)
    return tiers


def static_picture(fig: go.Figure) -> Picture:
    """The same data drawn by matplotlib: bar, scatter (lines/markers) and heatmap traces on one pair of axes, with
    the figure's title, axis titles and legend. Other trace types raise InvalidArgument (no silent blank image)."""
    out = _new_figure((fig.layout.width or 700) / DPI, (fig.layout.height or 400) / DPI)
    ax = out.add_subplot()
    for trace in fig.data:
        name = trace.name or None
        if trace.type == "bar":
            x, y = list(trace.x), list(trace.y)
            if trace.orientation == "h":
                ax.barh([str(v) for v in y], x, label=name)
            else:
                ax.bar([str(v) for v in x], y, label=name)
        elif trace.type == "scatter":
            mode = trace.mode or "lines"
            style = ("-" if "lines" in mode else "") + ("o" if "markers" in mode else "")
            ax.plot(list(trace.x), list(trace.y), style or "-", label=name, markersize=4)
            if "text" in mode and trace.text is not None:  # the points' labels, as plotly draws them
                for (x, y), label, tier in zip(zip(trace.x, trace.y, strict=False), trace.text, _tiers(trace),
                                               strict=False):
                    ax.annotate(str(label), (x, y), xytext=(0, 5 + 10 * tier), textcoords="offset points",
                                ha="center", fontsize=7)
        elif trace.type == "heatmap":
            z = np.asarray(trace.z, float)
            cmap, low, high = _colours(z, None, None, None)
            image = ax.imshow(z, aspect="auto", cmap=cmap, vmin=low, vmax=high)
            out.colorbar(image, ax=ax, label=_text(trace.colorbar.title) or "value")
        else:
            raise InvalidArgument(f"a static fallback draws bar, scatter and heatmap traces; got {trace.type!r}")
    if any(t.name for t in fig.data) and len(fig.data) > 1:
        ax.legend(fontsize=8)
    if fig.layout.xaxis.categoryorder is None and any(t.type == "bar" for t in fig.data):
        ax.tick_params(axis="x", labelrotation=45 if len(fig.data[0].x or []) > 6 else 0)
    if fig.layout.xaxis.type == "log":
        ax.set_xscale("log")
    if fig.layout.yaxis.type == "log":
        ax.set_yscale("log")
    if fig.layout.yaxis.autorange == "reversed":
        ax.invert_yaxis()
    ax.set_xlabel(_text(fig.layout.xaxis.title))
    ax.set_ylabel(_text(fig.layout.yaxis.title))
    if _text(fig.layout.title):
        ax.set_title(_text(fig.layout.title), fontsize=11, wrap=True)
    return Picture(out)


class Chart(go.Figure):
    """A plotly figure (every plotly method works) whose notebook output carries both plotly's JSON, drawn
    interactively by JupyterLab's plotly renderer, and a PNG of the same data (:func:`static_picture`) that
    nbconvert, GitHub and docs sites show. No text/html is emitted: its script needs plotly.js, which static
    pages do not load, and it would hide the PNG."""

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        import plotly.io as pio

        bundle = pio.renderers["plotly_mimetype"].to_mimebundle(self.to_dict())
        bundle["image/png"] = base64.b64encode(static_picture(self).png()).decode("ascii")
        bundle["text/plain"] = f"<Chart {_text(self.layout.title)!r}: {len(self.data)} traces>"
        return bundle

    def _ipython_display_(self) -> None:  # plotly's own hook would display its renderer's bundle, without the PNG
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
