import math
import os
import shutil

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import random_images

from negtrace import plot
from negtrace.patching.engine import patch
from negtrace.patching.result import CTEResult, aggregate

SITES = ("resid", "attn", "mlp")
NEGATED = ["there is no pleural effusion.", "no pneumothorax is seen.", "the heart is not enlarged.",
           "there is no focal consolidation."]
HAS_CHROMIUM = any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))
needs_chromium = pytest.mark.skipif(not HAS_CHROMIUM, reason="static export needs Chrome/Chromium")


@pytest.fixture(scope="module")
def single(tiny_clip):
    return patch(tiny_clip, "there is no pleural effusion.", image=random_images(tiny_clip, 1), sites=SITES,
                 heads=True)


@pytest.fixture(scope="module")
def agg(tiny_clip):
    return aggregate(patch(tiny_clip, clean=NEGATED, image=random_images(tiny_clip, len(NEGATED)), sites=SITES,
                           heads=True), n_boot=200)


@pytest.fixture(scope="module")
def vision():
    L, gh, gw = 3, 3, 3
    values = torch.linspace(-0.5, 1.0, (L + 1) * (1 + gh * gw)).reshape(1, L + 1, 1 + gh * gw)
    values[0, 0] = float("nan")
    return CTEResult(values=values, sites=("resid",), labels=["[CLS]"] + [f"p{i}" for i in range(gh * gw)],
                     tower="vision", grid=(gh, gw))


def heatmaps(fig):
    return [t for t in fig.data if isinstance(t, go.Heatmap)]


def test_heatmap_axes_ticks_and_cue_marks(single):
    fig = plot.heatmap(single, sites="resid")
    assert fig.layout.xaxis.title.text == "token"
    assert fig.layout.yaxis.title.text == "layer"
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[1] == "there" and "<b>no*</b>" in ticks
    assert ticks.index("<b>no*</b>") == single.cue_positions[0]
    assert list(fig.layout.yaxis.ticktext) == ["emb"] + [str(i) for i in range(1, single.n_layers + 1)]
    cue = single.cue_positions[0]
    assert any(s.type == "rect" and s.x0 == cue - 0.5 and s.x1 == cue + 0.5 for s in fig.layout.shapes)


def test_heatmap_colour_range_is_symmetric_and_titled(single):
    fig = plot.heatmap(single)
    ax = fig.layout.coloraxis
    peak = np.nanmax(np.abs(single.values.numpy()))
    assert ax.cmin == -ax.cmax and math.isclose(ax.cmax, peak, rel_tol=1e-6)
    assert ax.colorscale and ax.reversescale
    assert ax.colorbar.title.text == "CTE (logit, normalised)"


def test_heatmap_range_never_empty():
    zero = CTEResult(values=torch.zeros(1, 3, 2), sites=("resid",), labels=["a", "b"])
    ax = plot.heatmap(zero).layout.coloraxis
    assert ax.cmax == pytest.approx(1e-6) and ax.cmin == -ax.cmax


def test_heatmap_facets_share_one_coloraxis_and_keep_nan(single):
    fig = plot.heatmap(single)
    traces = heatmaps(fig)
    assert len(traces) == 3 and {t.coloraxis for t in traces} == {"coloraxis"}
    assert [a.text for a in fig.layout.annotations] == list(SITES)
    assert {t.xaxis for t in traces} == {"x", "x2", "x3"}
    attn = np.asarray(traces[1].z, dtype=float)
    assert np.isnan(attn[0]).all()  # attn has no embedding row: blank, not zero


def test_heatmap_hover_single(single):
    fig = plot.heatmap(single, sites=["resid"])
    cue = single.cue_positions[0]
    text = fig.data[0].hovertext[2][cue]
    assert "token: no" in text and "layer: 2" in text
    assert f"CTE: {single.values[0, 2, cue].item():.3f}" in text
    assert "CI" not in text


def test_heatmap_aggregate_roles_ci_and_n(agg):
    fig = plot.heatmap(agg)
    assert fig.layout.xaxis.title.text == "role"
    assert list(fig.layout.xaxis.ticktext)[:3] == ["start", "before cue", "<b>cue*</b>"]
    text = fig.data[0].hovertext[1][2]
    lo, hi = agg.ci_low[0, 1, 2].item(), agg.ci_high[0, 1, 2].item()
    assert "role: cue" in text and "layer: 1" in text and "CTE: " in text
    assert f"[{lo:.3f}, {hi:.3f}]" in text and f"n: {int(agg.n[2])}" in text


def test_heatmap_unknown_site(single):
    with pytest.raises(KeyError, match="not swept"):
        plot.heatmap(single, sites=["nope"])


def test_head_heatmap(single):
    fig = plot.head_heatmap(single)
    L, H = single.head_values.shape
    assert np.asarray(fig.data[0].z).shape == (L, H)
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert list(fig.layout.yaxis.ticktext) == [str(i) for i in range(1, L + 1)]
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    with pytest.raises(ValueError, match="heads=True"):
        plot.head_heatmap(CTEResult(values=torch.zeros(1, 2, 2), sites=("resid",), labels=["a", "b"]))


def test_layer_bar_single_and_aggregate(single, agg):
    bar = plot.layer_bar(single).data[0]
    assert list(bar.x) == ["emb"] + [str(i) for i in range(1, single.n_layers + 1)]
    np.testing.assert_allclose(bar.y, single.per_layer("resid", "mean").numpy(), rtol=1e-6)
    assert bar.error_y.array is None
    bar = plot.layer_bar(agg, site="resid", stat="cue").data[0]
    y = agg.per_layer("resid", "cue").numpy()
    np.testing.assert_allclose(bar.y, y, rtol=1e-6)
    upper = np.asarray(bar.y) + np.asarray(bar.error_y.array)
    lower = np.asarray(bar.y) - np.asarray(bar.error_y.arrayminus)
    assert np.all(upper >= y - 1e-6) and np.all(lower <= y + 1e-6)
    np.testing.assert_allclose(upper, np.maximum(agg.ci_high[0, :, 2].numpy(), y), rtol=1e-5)


def test_patch_grid(vision):
    fig = plot.patch_grid(vision)
    traces = heatmaps(fig)
    assert len(traces) == 3  # row 0 (emb) has no measured patch
    assert np.asarray(traces[0].z).shape == (3, 3)
    np.testing.assert_allclose(np.asarray(traces[0].z).ravel(), vision.values[0, 1, 1:].numpy(), rtol=1e-6)
    assert [a.text for a in fig.layout.annotations] == ["layer 1", "layer 2", "layer 3"]
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax


def test_patch_grid_over_image(vision):
    image = torch.rand(3, 24, 24)
    fig = plot.patch_grid(vision, image=image, layers=[2])
    under, effects = heatmaps(fig)
    assert np.asarray(under.z).shape == (24, 24) and under.showscale is False
    assert effects.opacity < 1 and effects.coloraxis == "coloraxis"


def test_patch_grid_needs_vision(single):
    with pytest.raises(ValueError, match="vision"):
        plot.patch_grid(single)


def test_save_html(tmp_path, single):
    out = plot.save_figure(plot.heatmap(single), tmp_path / "sub" / "map.html", show_logo=False, modebar=False)
    data = out.read_bytes()
    assert b"<html" in data and b"plotly" in data
    assert b'"displaylogo": false' in data and b'"displayModeBar": false' in data
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@needs_chromium
@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".svg", b"<svg"), (".pdf", b"%PDF")])
def test_save_static(tmp_path, agg, ext, magic):
    out = plot.save_figure(plot.heatmap(agg, sites="resid"), tmp_path / f"map{ext}", width=500, height=350)
    data = out.read_bytes()
    assert data and (data.startswith(magic) if ext != ".svg" else magic in data)


@needs_chromium
def test_paper_layout_sets_size_and_dpi(tmp_path, single):
    fig = plot.paper_layout(plot.layer_bar(single), width_in=2.0, height_in=1.5, dpi=192)
    assert (fig.layout.width, fig.layout.height) == (192, 144) and fig.layout.font.size == 8
    data = plot.save_figure(fig, tmp_path / "bar.png").read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (384, 288)  # 2 in x 192 dpi


def test_paper_layout_copies(single):
    fig = plot.layer_bar(single)
    plot.paper_layout(fig)
    assert fig.layout.width is None


def test_unknown_extension(tmp_path, single):
    with pytest.raises(ValueError, match=r"\.html, \.png, \.svg, \.pdf"):
        plot.save_figure(plot.heatmap(single), tmp_path / "map.jpg")


def test_output_folder_is_a_file(tmp_path, single):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="file"):
        plot.save_figure(plot.heatmap(single), blocker / "map.html")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path, single):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="locked"):
            plot.save_figure(plot.heatmap(single), locked / "map.html")
    finally:
        locked.chmod(0o700)


def test_unwritable_folder_message(tmp_path, single, monkeypatch):
    monkeypatch.setattr(plot.os, "access", lambda *a, **k: False)
    with pytest.raises(PermissionError, match=f"{tmp_path.name}.*not writable"):
        plot.save_figure(plot.heatmap(single), tmp_path / "map.html")


def test_missing_chrome_is_named(tmp_path, single, monkeypatch):
    from choreographer.errors import ChromeNotFoundError

    def no_chrome(*args, **kwargs):
        raise ChromeNotFoundError("no browser")

    monkeypatch.setattr("plotly.io.to_image", no_chrome)
    with pytest.raises(RuntimeError, match="Chrome/Chromium.*apt-get install chromium"):
        plot.save_figure(plot.heatmap(single), tmp_path / "map.png")
    assert not (tmp_path / "map.png").exists()
