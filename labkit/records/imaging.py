"""Attention images and head patterns in one place for notebooks (``labkit.records.imaging.heatmap``,
``labkit.records.imaging.classify_heads``): the drawing is :mod:`labkit.records.figures`, the pattern analysis
:mod:`labkit.measures.patterns`; this module only re-exports both."""

from labkit.measures.patterns import (
    FILTERS,
    HeadPattern,
    Pattern,
    PatternThresholds,
    classify,
    classify_heads,
    pattern_features,
)
from labkit.records.figures import Picture, head_grid, heatmap, layer_head_summary, to_png

__all__ = ["FILTERS", "HeadPattern", "Pattern", "PatternThresholds", "Picture", "classify", "classify_heads",
           "head_grid", "heatmap", "layer_head_summary", "pattern_features", "to_png"]
