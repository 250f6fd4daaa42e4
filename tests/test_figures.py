"""Static figures: labelled axes, token tick labels, a colour bar with its unit, titles that fit, no missing glyphs,
a readable minimum size, and plotly charts that carry a PNG for static exports."""

import base64
import io
import warnings

import pytest
import torch
from PIL import Image

from labkit.core.errors import InvalidArgument
from labkit.records import figures

TOKENS = [" The", " capital", " of", " France", " is"]


def colorbar_labels(picture):
    """The label of every colour bar axis in the figure (matplotlib gives a colour bar its own axes)."""
    return [ax.get_ylabel() for ax in picture.figure.axes if getattr(ax, "_colorbar", None) is not None]


def render_strictly(picture):
    """PNG bytes, failing on any matplotlib warning (a missing glyph is one: "Glyph ... missing from font")."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return picture.png()


def test_heatmap_has_axis_labels_token_ticks_and_a_colour_bar_with_its_unit():
    pic = figures.heatmap(torch.eye(5), labels=TOKENS, title="layer 2 × head 1", colorbar="attention probability")
    ax = pic.figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key position", "query position")
    assert [t.get_text() for t in ax.get_xticklabels()] == [repr(t) for t in TOKENS]  # leading spaces visible
    assert [t.get_text() for t in ax.get_yticklabels()] == [repr(t) for t in TOKENS]
    assert colorbar_labels(pic) == ["attention probability"]
    assert pic.size[0] >= 500 and pic.size[1] >= 360


def test_titles_with_special_glyphs_render_without_missing_glyph_warnings():
    pic = figures.heatmap(torch.rand(4, 4), title="layer × head → KL(p‖q) in bits² for ' ␣'", colorbar="bits")
    png = render_strictly(pic)
    assert Image.open(io.BytesIO(png)).size == pic.size


def test_a_long_title_stays_inside_the_figure():
    pic = figures.heatmap(torch.rand(6, 6), size=200, title="a very long title " * 6)
    pic.png()  # layout and wrapping happen at draw time
    title = pic.figure.axes[0].title
    box = title.get_window_extent(pic.figure.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= pic.size[0]


def test_layer_head_summary_labels_layers_and_heads_and_stays_a_readable_shape():
    pic = figures.layer_head_summary(torch.rand(30, 9), title="mean attention entropy", colorbar="entropy (bits)")
    ax = pic.figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in range(9)]
    assert len(ax.get_yticklabels()) == 30
    assert colorbar_labels(pic) == ["entropy (bits)"]
    w, h = pic.size
    assert h <= 1.6 * w  # 30 × 9 cells are drawn oblong, not as a 2,000 px strip


def test_long_token_axes_fall_back_to_numbered_ticks():
    pic = figures.heatmap(torch.rand(200, 200), labels=[str(i) for i in range(200)])
    assert len(pic.figure.axes[0].get_xticklabels()) < 30


def test_head_grid_titles_every_panel_labels_outer_axes_and_shares_one_colour_bar():
    maps = torch.rand(6, 8, 8).softmax(-1)
    pic = figures.head_grid(maps, titles=[f"L3 H{h}" for h in range(6)], title="layer 3")
    panels = [ax for ax in pic.figure.axes if getattr(ax, "_colorbar", None) is None and ax.get_visible()]
    assert [ax.get_title() for ax in panels if ax.get_title()] == [f"L3 H{h}" for h in range(6)]
    assert any(ax.get_xlabel() == "key" for ax in panels) and any(ax.get_ylabel() == "query" for ax in panels)
    assert colorbar_labels(pic) == ["attention probability"]
    assert pic.title == "layer 3"


def test_bad_figure_inputs_name_the_parameter():
    with pytest.raises(InvalidArgument, match="labels must have one entry per row"):
        figures.heatmap(torch.eye(3), labels=["a"])
    with pytest.raises(InvalidArgument, match="labels is for a square matrix"):
        figures.heatmap(torch.ones(2, 3), labels=["a", "b"])
    with pytest.raises(InvalidArgument, match="size must be"):
        figures.heatmap(torch.eye(3), size=5)
    with pytest.raises(InvalidArgument, match="shape"):
        figures.heatmap(torch.ones(3))


def test_picture_saves_atomically_and_shows_as_png(tmp_path):
    pic = figures.heatmap(torch.eye(3))
    assert pic._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    path = pic.save(tmp_path / "map.svg")
    assert path.read_text().lstrip().startswith("<?xml") and not list(tmp_path.glob(".*tmp"))


def test_chart_stays_plotly_and_carries_a_png_of_the_same_bars():
    chart = figures.Chart()
    chart.add_bar(x=[repr(t) for t in TOKENS], y=[0.5, 0.2, 0.1, 0.1, 0.1], name="p")
    chart.update_layout(title="next token", xaxis_title="token", yaxis_title="probability")
    bundle = chart._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle and "text/html" not in bundle
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figures.static_picture(chart).figure.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("token", "probability", "next token")
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.5, 0.2, 0.1, 0.1, 0.1])


def test_static_fallback_refuses_trace_types_it_cannot_draw():
    chart = figures.Chart()
    chart.add_pie(values=[1, 2])
    with pytest.raises(InvalidArgument, match="bar, scatter and heatmap"):
        figures.static_picture(chart)


def test_every_stored_notebook_image_was_drawn_by_labkit_figures():
    """Each PNG in the notebooks' outputs comes from a Picture or a Chart (so it has the axes, labels and colour bar
    tested above), not from a bare PIL image or an unlabelled plot."""
    import json
    from pathlib import Path

    images = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if "image/png" in data:
                    images += 1
                    text = "".join(data.get("text/plain", ""))
                    assert text.startswith(("<Picture", "<Chart")), f"{path.name}: an image from {text[:40]!r}"
                if "application/vnd.plotly.v1+json" in data:
                    assert "image/png" in data, f"{path.name}: a plotly chart without its static PNG"
    assert images >= 10


def test_labels_of_points_that_nearly_coincide_are_stacked_not_printed_over_each_other():
    import plotly.graph_objects as go

    from labkit.records.figures import Chart, static_picture

    names = ["quant:bits=4,residual=64,int8=0,group=32", "quant:bits=8,residual=0,int8=0,group=32",
             "quant:bits=4,residual=128,int8=0,group=32", "full", "h2o:budget=40,recent=24"]
    chart = Chart(data=[go.Scatter(x=[0.27, 0.29, 0.31, 1.0, 0.2], y=[0.0, 0.0, 0.0, 0.0, 0.45],
                                   mode="markers+text", text=names)])
    chart.update_layout(title="memory against KL", xaxis_title="memory", yaxis_title="KL (bits)")
    fig = static_picture(chart).figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(names)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two point labels overlap"


def _broken(picture) -> str:
    return "; ".join(figures.problems(picture))


def test_figure_rules_pass_on_labkit_figures_and_catch_each_broken_rule():
    from matplotlib.figure import Figure

    signed = torch.tensor([[-2.0, 0.5], [1.0, -0.1]])
    ok = [figures.heatmap(torch.rand(5, 5), labels=TOKENS),
          figures.heatmap(signed, x_labels=[0, 1], y_labels=[10, 11], xlabel="head", ylabel="layer",
                          colorbar="drop (nats)"),
          figures.layer_head_summary(torch.rand(4, 3), colorbar="entropy (bits)")]
    for picture in ok:
        assert figures.problems(picture) == [], figures.problems(picture)
    auto = ok[1].figure.axes[0].get_images()[0]  # signed values: a diverging map centred on 0, chosen unasked
    assert auto.get_cmap().name == "RdBu_r" and auto.get_clim() == (-2.0, 2.0)

    one_way = figures.heatmap(signed, cmap="magma", x_labels=[0, 1], y_labels=[0, 1], colorbar="nats")
    assert "one-directional colour map 'magma'" in _broken(one_way)
    off_centre = figures.heatmap(signed, cmap="RdBu_r", vmin=-2, vmax=1, x_labels=[0, 1], y_labels=[0, 1],
                                 colorbar="nats")
    assert "not centred on 0" in _broken(off_centre)
    quoted = figures.heatmap(torch.rand(2, 2), x_labels=["0", "1"], y_labels=["a", "b"], colorbar="p")
    assert "numeric tick label is quoted: '0'" in _broken(quoted)  # numbers given as text are drawn as tokens

    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot([1, 2, 3], [1, 4, 9], "o")  # points, no labels, no axis titles
    ax.text(2.9, 9, "a label that runs far past the right edge of the figure", fontsize=12)
    bare = figures.Picture(fig)
    broken = _broken(bare)
    assert "the x axis has no label" in broken and "the y axis has no label" in broken
    assert "something runs off the figure" in broken
    ax.texts[0].remove()
    assert "points without labels" in _broken(bare)


def test_strict_figure_rules_refuse_to_draw_a_broken_figure(monkeypatch):
    signed = torch.tensor([[-1.0, 1.0]])
    broken = figures.heatmap(signed, cmap="viridis", vmin=-1, vmax=1, x_labels=[0, 1], y_labels=[0], colorbar="x")
    assert broken.png()  # drawn, by default
    monkeypatch.setenv(figures.STRICT_ENV, "error")
    with pytest.raises(InvalidArgument, match="breaks the figure rules: signed values"):
        broken.png()
