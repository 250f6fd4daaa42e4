"""Attention head patterns: CNN-style analysis of a head's (T, T) attention matrix (an attention measure).

Pattern analysis convolves the matrix with fixed 3×3 filters (Sobel x/y, Laplacian, diagonal), measures where its
mass lies and its spatial entropy (bits), and labels the head: first-token/sink, previous-token, Diagonal, Local,
Clustered, Global or Sparse.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from labkit.core.errors import InvalidArgument

FILTERS: dict[str, torch.Tensor] = {
    "sobel_x": torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]),
    "sobel_y": torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]),
    "laplacian": torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
    "diagonal": torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]]),
}
"""Fixed 3×3 filters. Sobel x/y: vertical/horizontal edges (a column everyone attends to, block borders);
Laplacian: isolated peaks (sparse attention); diagonal: lines parallel to the main diagonal."""


class Pattern(enum.StrEnum):
    """The label of one head's attention pattern (its value is the text shown in tables and figures)."""

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
    """Mean ``|response|`` of each fixed filter over the matrix, relative to its mean absolute value."""
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
