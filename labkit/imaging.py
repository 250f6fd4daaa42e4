"""Attention matrices as images, and CNN-style pattern analysis of attention heads.

Images are PIL images (``to_png`` gives PNG bytes for ``ipywidgets.Image``), coloured with the perceptual
Viridis colormap. Pattern analysis convolves a head's (T, T) matrix with fixed 3×3 filters (Sobel x/y,
Laplacian, diagonal), measures where its mass lies and its spatial entropy (bits), and labels the head.
"""

from __future__ import annotations

import enum
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from labkit.errors import InvalidArgument

# Viridis (matplotlib's perceptual colormap), as plotly ships it: 10 stops, interpolated to 256 entries.
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
            "#fde725"]


def _lut(stops: list[str]) -> np.ndarray:
    rgb = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in stops], dtype=np.float64)  # (S, 3)
    x = np.linspace(0, 1, len(stops))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, x, rgb[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)  # (256, 3)


VIRIDIS_LUT = _lut(_VIRIDIS)


def _as_2d(matrix: torch.Tensor | np.ndarray, name: str = "matrix") -> np.ndarray:
    a = matrix.detach().float().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if a.ndim != 2 or a.size == 0:
        raise InvalidArgument(f"{name} must be a non-empty 2-D array; got shape {a.shape}")
    return a


def colorize(matrix: torch.Tensor | np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Shape (H, W) -> (H, W, 3) uint8 Viridis colours; NaN/−inf cells are drawn black."""
    a = _as_2d(matrix)
    finite = np.isfinite(a)
    lo = float(a[finite].min()) if vmin is None and finite.any() else (vmin or 0.0)
    hi = float(a[finite].max()) if vmax is None and finite.any() else (vmax if vmax is not None else 1.0)
    scaled = np.clip((np.where(finite, a, lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = VIRIDIS_LUT[(scaled * 255).round().astype(np.int64)]
    rgb[~finite] = 0
    return rgb


def heatmap(matrix: torch.Tensor | np.ndarray, labels: list[str] | None = None, size: int = 512,
            vmin: float | None = 0.0, vmax: float | None = None, title: str | None = None) -> Image.Image:
    """One matrix as an image about ``size`` pixels wide; ``labels`` (one per row/column) are drawn when cells
    are large enough to read (≥ 10 px), which keeps a 200-token prompt legible as a picture."""
    a = _as_2d(matrix)
    if labels is not None and len(labels) != max(a.shape):
        raise InvalidArgument(f"labels must have one entry per row/column ({max(a.shape)}); got {len(labels)}")
    cell = max(1, size // max(a.shape))
    img = Image.fromarray(colorize(a, vmin, vmax)).resize((a.shape[1] * cell, a.shape[0] * cell), Image.NEAREST)
    show_labels = labels is not None and cell >= 10
    margin = 70 if show_labels else 0
    top = 16 if title else 0
    canvas = Image.new("RGB", (img.width + margin, img.height + margin + top), "white")
    canvas.paste(img, (margin, margin + top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((margin + 2, 2), title, fill="black", font=font)
    if show_labels:
        for i, text in enumerate(labels):  # rows: queries on the left; columns: keys on top (rotated)
            t = repr(text)[1:-1][:10]
            draw.text((2, margin + top + i * cell + (cell - 10) // 2), t, fill="black", font=font)
            col = Image.new("RGBA", (margin, cell), (255, 255, 255, 0))
            ImageDraw.Draw(col).text((2, (cell - 10) // 2), t, fill="black", font=font)
            canvas.paste(col.rotate(90, expand=True), (margin + i * cell, top), col.rotate(90, expand=True))
    return canvas


def head_grid(maps: torch.Tensor, cols: int | None = None, cell_size: int = 160,
              titles: list[str] | None = None) -> Image.Image:
    """Shape (N, T, T) -> a grid of N small heatmaps (e.g. all heads of one layer), each titled."""
    if maps.ndim != 3:
        raise InvalidArgument(f"maps must have shape (N, T, T); got {tuple(maps.shape)}")
    n = maps.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = [heatmap(maps[i], size=cell_size, title=titles[i] if titles else f"head {i}") for i in range(n)]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * (w + 4), rows * (h + 4)), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * (w + 4), (i // cols) * (h + 4)))
    return grid


def layer_head_summary(values: torch.Tensor, size: int = 480, title: str | None = None) -> Image.Image:
    """Shape (L, H) -> an image with one cell per (layer, head), e.g. mean attention entropy in bits."""
    if values.ndim != 2:
        raise InvalidArgument(f"values must have shape (L, H); got {tuple(values.shape)}")
    return heatmap(values, size=size, vmin=None, title=title)


def to_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (what ``ipywidgets.Image(value=...)`` takes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- pattern analysis ------------------------------------------------------------------------------------

FILTERS: dict[str, torch.Tensor] = {
    "sobel_x": torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]),
    "sobel_y": torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]),
    "laplacian": torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
    "diagonal": torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]]),
}
"""Fixed 3×3 filters. Sobel x/y: vertical/horizontal edges (a column everyone attends to, block borders);
Laplacian: isolated peaks (sparse attention); diagonal: lines parallel to the main diagonal."""


class Pattern(enum.StrEnum):
    SINK = "first-token/sink"
    PREVIOUS = "previous-token"
    DIAGONAL = "Diagonal"
    LOCAL = "Local"
    CLUSTERED = "Clustered"
    GLOBAL = "Global"
    SPARSE = "Sparse"


@dataclass(frozen=True)
class PatternThresholds:
    """Rules of :func:`classify`, applied in this order (masses are mean fractions of a row's attention)."""

    sink_mass: float = 0.5
    previous_mass: float = 0.5
    diagonal_mass: float = 0.5
    local_mass: float = 0.6
    local_window: int = 3
    global_row_entropy: float = 0.75
    """Global when rows' entropy is at least this fraction of the maximum log2(i + 1) bits."""
    cluster_fraction: float = 0.25
    """Clustered when rows start their attention at ≥ 2 and ≤ this fraction × T distinct positions."""


@dataclass
class HeadPattern:
    """The label of one head's (T, T) attention matrix and the features behind it."""

    label: Pattern
    features: dict[str, float] = field(default_factory=dict)


def _filter_energy(a: torch.Tensor) -> dict[str, float]:
    """Mean |response| of each fixed filter over the matrix, relative to its mean absolute value."""
    x = a[None, None]  # (1, 1, T, T)
    base = float(a.abs().mean()) or 1.0
    return {name: float(torch.nn.functional.conv2d(x, k[None, None], padding=1).abs().mean()) / base
            for name, k in FILTERS.items()}


def pattern_features(matrix: torch.Tensor, t: PatternThresholds = PatternThresholds()) -> dict[str, float]:
    """Features of a causal attention matrix (rows = queries, each summing to 1): masses on the sink column,
    the previous token, the diagonal and a local band; normalised row entropy; spatial entropy (bits) of the
    whole matrix; distinct segment starts; and the filter energies."""
    a = torch.as_tensor(matrix).float()
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 4:
        raise InvalidArgument(f"matrix must be square (T, T) with T ≥ 4; got {tuple(a.shape)}")
    n = a.shape[0]
    rows = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    i = torch.arange(n)
    dist = i[:, None] - i[None, :]  # query − key
    row_h = -(rows * torch.log2(rows.clamp_min(1e-30))).sum(-1)  # (T,) bits
    max_h = torch.log2(i.float() + 1)  # keys available to each causal row
    later = slice(1, None)  # rows with a choice to make
    flat = rows.flatten() / rows.sum()
    peaks = rows >= 0.5 * rows.max(-1, keepdim=True).values
    starts = peaks.float().argmax(-1)  # first strong key of each row
    feats = {
        "sink_mass": float(rows[later, 0].mean()),
        "previous_mass": float(rows[i[later], i[later] - 1].mean()),
        "diagonal_mass": float(rows.diagonal()[later].mean()),
        "local_mass": float(rows.where((dist >= 0) & (dist <= t.local_window), torch.zeros(())).sum(-1)[later].mean()),
        "row_entropy_norm": float((row_h[later] / max_h[later]).mean()),
        "spatial_entropy_bits": float(-(flat * torch.log2(flat.clamp_min(1e-30))).sum()),
        "distinct_starts": float(len(set(starts[later].tolist()))),
    }
    feats.update(_filter_energy(rows))
    return feats


def classify(matrix: torch.Tensor, t: PatternThresholds = PatternThresholds()) -> HeadPattern:
    """Label a head's attention matrix: first-token/sink, previous-token, Diagonal, Local, Clustered, Global,
    or Sparse (the rest: attention concentrated on a few scattered positions)."""
    f = pattern_features(matrix, t)
    n = torch.as_tensor(matrix).shape[0]
    if f["sink_mass"] > t.sink_mass:
        label = Pattern.SINK
    elif f["previous_mass"] > t.previous_mass:
        label = Pattern.PREVIOUS
    elif f["diagonal_mass"] > t.diagonal_mass:
        label = Pattern.DIAGONAL
    elif f["row_entropy_norm"] >= t.global_row_entropy:
        label = Pattern.GLOBAL
    elif 2 <= f["distinct_starts"] <= t.cluster_fraction * n and f["sobel_y"] > f["diagonal"]:
        label = Pattern.CLUSTERED
    elif f["local_mass"] > t.local_mass:
        label = Pattern.LOCAL
    else:
        label = Pattern.SPARSE
    return HeadPattern(label, f)


def classify_heads(maps: torch.Tensor, t: PatternThresholds = PatternThresholds()) -> list[list[HeadPattern]]:
    """Shape (L, H, T, T) -> an L × H table of HeadPattern."""
    if maps.ndim != 4:
        raise InvalidArgument(f"maps must have shape (L, H, T, T); got {tuple(maps.shape)}")
    return [[classify(maps[layer, head], t) for head in range(maps.shape[1])] for layer in range(maps.shape[0])]
