"""Attention images and head patterns in one place for notebooks (``labkit.imaging.heatmap``,
``labkit.imaging.classify_heads``): the drawing is :mod:`labkit.figures`, the pattern analysis
:mod:`labkit.patterns`; this module only re-exports both."""

from labkit.figures import Picture, head_grid, heatmap, layer_head_summary, to_png
from labkit.patterns import (
    FILTERS,
    HeadPattern,
    Pattern,
    PatternThresholds,
    classify,
    classify_heads,
    pattern_features,
)

__all__ = ["FILTERS", "HeadPattern", "Pattern", "PatternThresholds", "Picture", "classify", "classify_heads",
           "head_grid", "heatmap", "layer_head_summary", "pattern_features", "to_png"]
