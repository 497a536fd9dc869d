"""Plotly figures of causal-tracing results, and export to HTML / PNG / SVG / PDF.

Every figure uses a diverging colour scale (RdBu reversed: red = restoring the clean state
recovers the clean metric, blue = it pushes the other way) centred at 0 with a symmetric
range, so colours mean the same thing across facets. Only ``plotly.graph_objects`` is
used and no global plotly setting (templates, renderers) is touched.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .patching.result import CTEResult

COLORSCALE = "RdBu"
SITE_ORDER = ("resid", "attn", "mlp")
SUPPORTED_EXTENSIONS = (".html", ".png", ".svg", ".pdf")
CSS_DPI = 96  # plotly sizes figures in CSS pixels, 96 per inch
CUE_LINE = dict(color="black", width=1.5)
MISSING_CHROME = ("static export failed: kaleido needs Chrome/Chromium: apt-get install chromium, "
                  "or plotly_get_chrome")
_SCALE_KEY = "negtrace_export_scale"


# -- shared helpers ----------------------------------------------------------------------
def colorbar_title(result: CTEResult) -> str:
    return f"CTE ({result.metric}, normalised)"


def symmetric_limit(*arrays) -> float:
    """Largest finite |value| over ``arrays`` (at least 1e-6, so the range is never empty)."""
    finite = [np.abs(a[np.isfinite(a)]) for a in (np.asarray(x, dtype=float) for x in arrays)]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    return max(peak, 1e-6)


def _coloraxis(result: CTEResult, zmax: float) -> dict:
    return dict(colorscale=COLORSCALE, reversescale=True, cmin=-zmax, cmax=zmax, cmid=0.0,
                colorbar=dict(title=dict(text=colorbar_title(result), side="right")))


def layer_labels(n_rows: int) -> list[str]:
    return ["emb"] + [str(i) for i in range(1, n_rows)]


def cue_columns(result: CTEResult) -> list[int]:
    if result.cue_positions:
        return list(result.cue_positions)
    return [i for i, label in enumerate(result.labels) if label in ("cue", "a/some/no")]


def position_labels(result: CTEResult) -> list[str]:
    """Tick labels; cue tokens/roles are bold and starred (``<b>no*</b>``)."""
    cues = set(cue_columns(result))
    return [f"<b>{label}*</b>" if i in cues else label for i, label in enumerate(result.labels)]


def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=float)


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def _subject(result: CTEResult) -> str:
    if result.is_aggregate:
        n = int(_numpy(result.n).max()) if result.n is not None and len(result.n) else 0
        return f"aggregate, n={n}"
    return repr(result.text)


def _default_title(result: CTEResult) -> str:
    setting = f"{result.tower} tower, corruption: {result.corruption}, window {result.window}"
    if result.is_aggregate:
        n = int(_numpy(result.n).max()) if result.n is not None and len(result.n) else 0
        return f"Causal tracing, aggregate of n={n} ({result.n_excluded} excluded) — {setting}"
    return f"Causal tracing: {result.text!r} — {setting}"


# -- layer x position heatmap -------------------------------------------------------------
def hover_text(result: CTEResult, site: str) -> list[list[str]]:
    """Per-cell hover strings: token/role, layer, CTE, and for aggregates CI and n."""
    values = _numpy(result.site(site))
    rows = layer_labels(values.shape[0])
    idx = result.sites.index(site)
    lo = _numpy(result.ci_low[idx]) if result.ci_low is not None else None
    hi = _numpy(result.ci_high[idx]) if result.ci_high is not None else None
    n = _numpy(result.n) if result.n is not None else None
    kind = "role" if result.is_aggregate else "token"
    out = []
    for r in range(values.shape[0]):
        row = []
        for p in range(values.shape[1]):
            text = f"{kind}: {result.labels[p]}<br>layer: {rows[r]}<br>site: {site}<br>CTE: {_fmt(values[r, p])}"
            if lo is not None and hi is not None:
                text += f"<br>95% bootstrap CI: [{_fmt(lo[r, p])}, {_fmt(hi[r, p])}]"
            if n is not None:
                text += f"<br>n: {int(n[p])}"
            row.append(text)
        out.append(row)
    return out


def _ordered_sites(result: CTEResult, sites) -> list[str]:
    if sites is None:
        return sorted(result.sites, key=lambda s: SITE_ORDER.index(s) if s in SITE_ORDER else len(SITE_ORDER))
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        result.site(s)  # raises a KeyError naming the swept sites
    return sites


def _cue_rectangles(fig: go.Figure, result: CTEResult, n_rows: int, col: int) -> None:
    for p in cue_columns(result):
        fig.add_shape(type="rect", x0=p - 0.5, x1=p + 0.5, y0=-0.5, y1=n_rows - 0.5, line=CUE_LINE,
                      fillcolor="rgba(0,0,0,0)", row=1, col=col)


def heatmap(result: CTEResult, sites=None, title: str | None = None) -> go.Figure:
    """Layer (y) x position (x) CTE heatmap, one facet per site, sharing one colour axis.

    Positions are numeric with token/role tick labels, so repeated tokens stay separate
    columns. Cue columns are starred in the ticks and boxed. NaN cells stay blank.
    """
    sites = _ordered_sites(result, sites)
    grids = {s: _numpy(result.site(s)) for s in sites}
    n_rows, n_pos = next(iter(grids.values())).shape
    fig = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, shared_yaxes=True,
                        horizontal_spacing=0.04 if len(sites) > 1 else 0.0)
    for col, site in enumerate(sites, start=1):
        fig.add_trace(go.Heatmap(z=grids[site], x=list(range(n_pos)), y=list(range(n_rows)), coloraxis="coloraxis",
                                 hovertext=hover_text(result, site), hoverinfo="text", name=site,
                                 xgap=1, ygap=1), row=1, col=col)
        _cue_rectangles(fig, result, n_rows, col)
        fig.update_xaxes(tickmode="array", tickvals=list(range(n_pos)), ticktext=position_labels(result),
                         tickangle=-60, title_text="role" if result.is_aggregate else "token", showgrid=False,
                         row=1, col=col)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_rows)), ticktext=layer_labels(n_rows), showgrid=False)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=dict(text=title or _default_title(result)),
                      coloraxis=_coloraxis(result, symmetric_limit(*grids.values())),
                      plot_bgcolor="white", width=max(420, 60 + len(sites) * (40 + 34 * n_pos)),
                      height=max(320, 200 + 28 * n_rows))
    return fig


# -- layer x head heatmap -----------------------------------------------------------------
def head_heatmap(result: CTEResult, title: str | None = None) -> go.Figure:
    """CTE of restoring one attention head (all positions) per layer and head."""
    if result.head_values is None:
        raise ValueError("this result has no head_values; run patch(..., heads=True)")
    values = _numpy(result.head_values)
    n_layers, n_heads = values.shape
    layers = [str(i) for i in range(1, n_layers + 1)]
    hover = [[f"layer: {layers[r]}<br>head: {h}<br>CTE: {_fmt(values[r, h])}" for h in range(n_heads)]
             for r in range(n_layers)]
    fig = go.Figure(go.Heatmap(z=values, x=list(range(n_heads)), y=list(range(n_layers)), coloraxis="coloraxis",
                               hovertext=hover, hoverinfo="text", xgap=1, ygap=1))
    fig.update_xaxes(title_text="head", tickmode="array", tickvals=list(range(n_heads)),
                     ticktext=[str(h) for h in range(n_heads)])
    fig.update_yaxes(title_text="layer", tickmode="array", tickvals=list(range(n_layers)), ticktext=layers)
    fig.update_layout(title=dict(text=title or f"Per-head CTE — {_subject(result)}"),
                      coloraxis=_coloraxis(result, symmetric_limit(values)), plot_bgcolor="white")
    return fig


# -- per-layer bars -----------------------------------------------------------------------
def layer_bar(result: CTEResult, site: str = "resid", stat: str = "mean", title: str | None = None) -> go.Figure:
    """Bar per layer of ``result.per_layer(site, stat)``.

    Aggregates get error bars from the same statistic applied to the ``ci_low`` and
    ``ci_high`` maps (e.g. for ``mean``, the mean over positions of the per-cell bounds).
    This is an envelope of the per-cell bootstrap intervals, not a bootstrap interval of the
    summary itself.
    """
    y = _numpy(result.per_layer(site, stat))
    x = layer_labels(len(y))
    bar = go.Bar(x=x, y=y, name=f"{site} {stat}", marker_color="#b2182b",
                 hovertemplate="layer %{x}<br>" + f"{stat} CTE" + ": %{y:.3f}<extra></extra>")
    if result.ci_low is not None and result.ci_high is not None:
        lo = _numpy(replace(result, values=result.ci_low).per_layer(site, stat))
        hi = _numpy(replace(result, values=result.ci_high).per_layer(site, stat))
        bar.error_y = dict(type="data", symmetric=False, array=np.clip(hi - y, 0, None),
                           arrayminus=np.clip(y - lo, 0, None), color="black", thickness=1)
    fig = go.Figure(bar)
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text=f"{stat} {colorbar_title(result)}", zeroline=True, zerolinecolor="gray")
    fig.update_layout(title=dict(text=title or f"{site}: per-layer {stat} CTE — {_subject(result)}"),
                      plot_bgcolor="white")
    return fig


# -- vision patch grids --------------------------------------------------------------------
def _grayscale(image) -> np.ndarray:
    """(H, W) array in [0, 1] from an (H, W), (C, H, W) or (H, W, C) image (tensor or array)."""
    img = _numpy(image)
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3:
        channel_axis = 0 if img.shape[0] in (1, 3, 4) else -1
        img = img.mean(axis=channel_axis)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), (C, H, W) or (H, W, C); got shape {_numpy(image).shape}")
    span = float(img.max() - img.min())
    return (img - img.min()) / span if span > 0 else np.zeros_like(img)


def _measured_rows(values: np.ndarray) -> list[int]:
    return [r for r in range(values.shape[0]) if np.isfinite(values[r, 1:]).any()]


def patch_grid(result: CTEResult, image=None, layers=None, site: str = "resid", cols: int | None = None,
               opacity: float = 0.6, title: str | None = None) -> go.Figure:
    """One (gh x gw) heatmap of patch effects per layer row, for vision-tower results.

    Position 0 (CLS) is left out; positions 1.. are patches in row-major order. With
    ``image`` the effects are drawn at ``opacity`` over the grayscale image. ``layers``
    are layer rows (0 = embedding); by default every row with a measured patch. Corrupted
    patches (``result.cue_positions``, e.g. those noised) are outlined when not all are.
    """
    if result.tower != "vision" or result.grid is None:
        raise ValueError("patch_grid needs a vision-tower result with a patch grid (result.grid)")
    gh, gw = result.grid
    values = _numpy(result.site(site))
    if values.shape[1] - 1 != gh * gw:
        raise ValueError(f"grid {gh}x{gw} needs {gh * gw} patch positions, result has {values.shape[1] - 1}")
    rows_to_plot = list(layers) if layers is not None else _measured_rows(values)
    if not rows_to_plot:
        raise ValueError("no layer has measured patch effects")
    names = layer_labels(values.shape[0])
    cols = cols or min(len(rows_to_plot), 4)
    nrows = math.ceil(len(rows_to_plot) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[f"layer {names[r]}" for r in rows_to_plot],
                        horizontal_spacing=0.02, vertical_spacing=0.08)
    gray = _grayscale(image) if image is not None else None
    for i, r in enumerate(rows_to_plot):
        row, col = divmod(i, cols)
        if gray is not None:
            fig.add_trace(_image_layer(gray, gh, gw), row=row + 1, col=col + 1)
        grid = values[r, 1:].reshape(gh, gw)
        hover = [[f"layer: {names[r]}<br>patch: ({y}, {x})<br>CTE: {_fmt(grid[y, x])}" for x in range(gw)]
                 for y in range(gh)]
        fig.add_trace(go.Heatmap(z=grid, coloraxis="coloraxis", hovertext=hover, hoverinfo="text",
                                 opacity=opacity if gray is not None else 1.0), row=row + 1, col=col + 1)
    _square_panels(fig, len(rows_to_plot), gh, gw)
    _corrupted_outlines(fig, result, len(rows_to_plot), cols)
    sel = values[rows_to_plot, 1:]
    fig.update_layout(title=dict(text=title or f"{site}: patch CTE — {_subject(result)}"),
                      coloraxis=_coloraxis(result, symmetric_limit(sel)), plot_bgcolor="white",
                      width=120 + 200 * cols, height=120 + 200 * nrows)
    return fig


def _corrupted_outlines(fig: go.Figure, result: CTEResult, n_panels: int, cols: int) -> None:
    """Outline the corrupted patches (``cue_positions``, 1-based) in every panel, unless all are."""
    gh, gw = result.grid
    patches = [p - 1 for p in result.cue_positions if 1 <= p <= gh * gw]
    if not patches or len(patches) == gh * gw:
        return
    for i in range(n_panels):
        for k in patches:
            r, c = divmod(k, gw)
            fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=CUE_LINE,
                          fillcolor="rgba(0,0,0,0)", row=i // cols + 1, col=i % cols + 1)


def _image_layer(gray: np.ndarray, gh: int, gw: int) -> go.Heatmap:
    """The image stretched over the patch cells, which sit at integer centres 0..gw-1, 0..gh-1."""
    h, w = gray.shape
    return go.Heatmap(z=gray, x0=-0.5 + gw / (2 * w), dx=gw / w, y0=-0.5 + gh / (2 * h), dy=gh / h,
                      colorscale="gray", showscale=False, hoverinfo="skip")


def _square_panels(fig: go.Figure, n_panels: int, gh: int, gw: int) -> None:
    for i in range(1, n_panels + 1):
        suffix = "" if i == 1 else str(i)
        fig.layout[f"xaxis{suffix}"].update(range=[-0.5, gw - 0.5], showticklabels=False, showgrid=False,
                                            zeroline=False, constrain="domain")
        fig.layout[f"yaxis{suffix}"].update(range=[gh - 0.5, -0.5], showticklabels=False, showgrid=False,
                                            zeroline=False, scaleanchor=f"x{suffix}", constrain="domain")


# -- export -------------------------------------------------------------------------------
def paper_layout(fig: go.Figure, width_in: float = 3.5, height_in: float = 2.6, dpi: int = 300,
                 font_family: str = "Arial", font_size: float = 8) -> go.Figure:
    """A copy sized for print: ``inches * 96`` CSS pixels, small font, tight margins.

    Static exports of the copy via :func:`save_figure` use ``scale = dpi / 96`` (stored in
    ``layout.meta``), so a 3.5 in wide PNG at 300 dpi is 1050 pixels wide. Vector formats
    (SVG/PDF) keep the physical size.
    """
    out = go.Figure(fig)
    meta = dict(out.layout.meta) if isinstance(out.layout.meta, dict) else {}
    meta[_SCALE_KEY] = dpi / CSS_DPI
    out.update_layout(width=round(width_in * CSS_DPI), height=round(height_in * CSS_DPI),
                      font=dict(family=font_family, size=font_size), meta=meta,
                      margin=dict(l=40, r=10, t=30, b=40), title_font_size=font_size + 1)
    return out


def save_figure(fig: go.Figure, path: str | os.PathLike, width: int | None = None, height: int | None = None,
                scale: float | None = None, dpi: float | None = None, inches: tuple[float, float] | None = None,
                font_family: str | None = None, font_size: float | None = None, include_plotlyjs="cdn",
                show_logo: bool = False, modebar: bool = True) -> Path:
    """Write ``fig`` atomically; the format follows the extension (.html, .png, .svg, .pdf).

    ``inches=(w, h)`` sets the size to ``w * 96 x h * 96`` pixels; ``dpi`` sets ``scale =
    dpi / 96`` (an explicit ``scale`` wins; without either, a :func:`paper_layout` scale is
    used). ``include_plotlyjs``/``show_logo``/``modebar`` apply to HTML only.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(f"unsupported figure format {path.suffix or '(none)'!r} for {path}; "
                         f"use one of {', '.join(SUPPORTED_EXTENSIONS)}")
    fig = go.Figure(fig)
    if font_family is not None or font_size is not None:
        fig.update_layout(font={k: v for k, v in (("family", font_family), ("size", font_size)) if v is not None})
    if inches is not None:
        width, height = round(inches[0] * CSS_DPI), round(inches[1] * CSS_DPI)
    if ext == ".html":
        config = {"displaylogo": show_logo, "displayModeBar": modebar}
        if width or height:
            fig.update_layout(width=width, height=height)
        html = fig.to_html(include_plotlyjs=include_plotlyjs, config=config, full_html=True)
        _write_atomic(path, html.encode("utf-8"))
    else:
        _ensure_writable_folder(path)
        scale = scale if scale is not None else (dpi / CSS_DPI if dpi is not None else _stored_scale(fig))
        _write_atomic(path, _static_bytes(fig, ext[1:], width, height, scale))
    return path


def _stored_scale(fig: go.Figure) -> float | None:
    meta = fig.layout.meta
    return meta.get(_SCALE_KEY) if isinstance(meta, dict) else None


def _static_bytes(fig: go.Figure, fmt: str, width, height, scale) -> bytes:
    import plotly.io as pio

    for attempt in range(2):
        try:
            return pio.to_image(fig, format=fmt, width=width, height=height, scale=scale)
        except Exception as err:
            if _is_missing_browser(err):
                raise RuntimeError(MISSING_CHROME) from err
            # kaleido sometimes queries its page before its scripts load (seen on busy CPUs); once more helps
            if attempt == 0 and "kaleido_scopes is not defined" in str(err):
                continue
            raise
    raise AssertionError("unreachable")


def _is_missing_browser(err: Exception) -> bool:
    try:
        from choreographer.errors import BrowserFailedError, ChromeNotFoundError
    except ImportError:
        BrowserFailedError = ChromeNotFoundError = ()  # noqa: N806 - isinstance() with () is always False
    if isinstance(err, (ChromeNotFoundError, BrowserFailedError)):
        return True
    # plotly re-raises kaleido's ChromeNotFoundError as a bare RuntimeError mentioning Chrome
    return isinstance(err, RuntimeError) and "chrome" in str(err).lower()


def _ensure_writable_folder(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(err.errno, f"cannot create output folder for {path}: {err.strerror}", str(folder)) from err
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {path}: output folder {folder} is not writable")


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the target folder, then os.replace: readers never see a partial file."""
    _ensure_writable_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}", str(path.parent)) from err
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
