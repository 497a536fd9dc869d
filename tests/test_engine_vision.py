"""Vision-tower tracing: the batched engine against a naive loop over the full model, one hook per cell."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import random_images

from negtrace import plot
from negtrace.models.sites import hook_name
from negtrace.patching.engine import patch
from negtrace.patching.result import aggregate

TEXT = "there is no pleural effusion."
SITES = ("resid", "attn", "mlp")


def _site_name(site, row):
    if site == "resid":
        return hook_name("vision", "resid_pre", 0) if row == 0 else hook_name("vision", "resid_post", row - 1)
    return hook_name("vision", {"attn": "attn_out", "mlp": "mlp_out"}[site], row - 1)


def _logit(model, image, hooks, text=TEXT):
    """The full model's image-text logit (both towers, no engine code)."""
    return float(model.run_with_hooks(texts=[text], images=image[None], fwd_hooks=hooks)[0, 0].detach())


def _image_logit(model, image, hooks, text_unit):
    """The same logit with the (unchanging) text embedding computed once: one vision forward per call."""
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        img = torch.nn.functional.normalize(model.encode_image(image[None]).float(), dim=-1)
    return float(model.logit_scale * (img[0] * text_unit).sum())


def _text_unit(model, text=TEXT):
    return torch.nn.functional.normalize(model.encode_text([text]).detach().float(), dim=-1)[0]


def _put(name, p, cache):
    def put(x, hook):
        x = x.clone()
        x[0, p] = cache[name][0, p]
        return x
    return name, put


def _oracle_positions(n):
    """Every position of small towers; CLS, first, middle and last patch of large ones (naive cells are slow)."""
    return list(range(n)) if n <= 17 else [0, 1, n // 2, n - 1]


def naive_vision_grid(model, clean, corrupted, site, positions, extra_hooks=(), rows=None):
    """Un-normalised restored logits (L+1, len(positions)), NaN in rows not run: one full forward per cell."""
    L = model.n_layers("vision")
    rows = [r for r in range(L + 1) if site == "resid" or r > 0] if rows is None else rows
    _, cache = model.run_with_cache(images=clean[None], names_filter=[_site_name(site, r) for r in rows])
    grid = torch.full((L + 1, len(positions)), float("nan"))
    text_unit = _text_unit(model)
    for r in rows:
        for j, p in enumerate(positions):
            grid[r, j] = _image_logit(model, corrupted, [*extra_hooks, _put(_site_name(site, r), p, cache)], text_unit)
    return grid


@pytest.fixture(scope="module")
def pair_results():
    return {}  # one traced pair per model, shared by the tests of this module


def _pair(model, cache):
    key = id(model)
    if key not in cache:
        clean, corrupted = random_images(model, 2, seed=1)
        cache[key] = (clean, corrupted, patch(model, TEXT, tower="vision", image=clean, corrupted_image=corrupted,
                                              sites=SITES, heads=True, min_denominator=0))
    return cache[key]


def test_vision_engine_equals_naive_loop(any_family, pair_results):
    clean, corrupted, res = _pair(any_family, pair_results)
    gh, gw = res.grid
    T = 1 + gh * gw
    assert res.tower == "vision" and res.values.shape == (3, any_family.n_layers("vision") + 1, T)
    assert res.labels[0] == "CLS" and res.labels[1] == "p(0,0)" and res.labels[-1] == f"p({gh - 1},{gw - 1})"
    m_clean, m_corr = _logit(any_family, clean, []), _logit(any_family, corrupted, [])
    assert abs(res.clean_metric - m_clean) < 1e-4 and abs(res.corrupted_metric - m_corr) < 1e-4
    positions = _oracle_positions(T)
    for site in SITES:
        expected = naive_vision_grid(any_family, clean, corrupted, site, positions)
        got = res.site(site)[:, positions] * res.denominator + res.corrupted_metric  # back to logits
        assert torch.equal(torch.isnan(expected), torch.isnan(got)), site
        mask = ~torch.isnan(expected)
        assert (got[mask] - expected[mask]).abs().max() <= 1e-4, site
    assert torch.isnan(res.site("attn")[0]).all() and not torch.isnan(res.site("resid")).any()


def test_vision_heads_equal_naive_loop(any_family, pair_results):
    clean, corrupted, res = _pair(any_family, pair_results)
    _, cache = any_family.run_with_cache(images=clean[None], names_filter=lambda n: n.endswith("hook_z"))
    text_unit = _text_unit(any_family)
    for layer in range(any_family.n_layers("vision")):
        name = hook_name("vision", "z", layer)
        for h in range(any_family.n_heads("vision")):
            def put(z, hook, h=h, name=name):
                z = z.clone()
                z[0, :, h] = cache[name][0, :, h]
                return z
            m = _image_logit(any_family, corrupted, [(name, put)], text_unit)
            got = float(res.head_values[layer, h]) * res.denominator + res.corrupted_metric
            assert abs(m - got) <= 1e-4, (layer, h)


def test_vision_restore_all_is_clean_and_restore_none_is_corrupted(any_family, pair_results):
    clean, corrupted, res = _pair(any_family, pair_results)
    resid = res.site("resid")
    # restoring every position entering block 0 turns the corrupted run into the clean one (naive, one hook)
    _, cache = any_family.run_with_cache(images=clean[None], names_filter=[_site_name("resid", 0)])

    def all_positions(x, hook):
        return cache[hook.name].clone()
    assert abs(_logit(any_family, corrupted, [(_site_name("resid", 0), all_positions)]) - res.clean_metric) < 1e-4
    # restoring nothing is the plain corrupted run
    assert abs(float(any_family.logits(corrupted[None], [TEXT])[0, 0]) - res.corrupted_metric) < 1e-4
    # CLS pooling: after the last block the CLS state is the whole output, patches are nothing
    assert abs(float(resid[-1, 0]) - 1.0) < 1e-4
    assert resid[-1, 1:].abs().max() * abs(res.denominator) < 1e-4


def test_vision_noise_is_seeded_and_mean_matches_per_sample_loop(tiny_clip):
    image = random_images(tiny_clip, 1, seed=2)[0]
    chosen, S = [0, 5, 6], 4
    kw = dict(tower="vision", image=image, corrupt="noise", patches=chosen, samples=S, seed=7, min_denominator=0)
    a, b = patch(tiny_clip, TEXT, **kw), patch(tiny_clip, TEXT, **kw)
    c = patch(tiny_clip, TEXT, **{**kw, "seed": 8})
    assert torch.equal(a.values, b.values) and not torch.equal(a.values, c.values)
    assert a.cue_positions == [k + 1 for k in chosen]
    # independent noise: ROME's recipe on the patch embeddings, one generator for this example
    _, cache = tiny_clip.run_with_cache(images=image[None], names_filter=[hook_name("vision", "embed")])
    emb = cache[hook_name("vision", "embed")][0]
    draw = torch.randn(S, len(chosen), emb.shape[-1], generator=torch.Generator().manual_seed(7)) * 3.0 * emb.std()
    T = emb.shape[0] + 1
    checked = [0, 1, 2, 6, 7, 16]  # CLS, noised patches 0 and 5 (positions 1, 6), untouched ones
    corrupted_runs, restored = [], torch.zeros(S, len(checked))
    for s in range(S):
        def add(x, hook, s=s):
            x = x.clone()
            x[0, chosen] += draw[s]
            return x
        noise = (hook_name("vision", "embed"), add)
        corrupted_runs.append(_image_logit(tiny_clip, image, [noise], _text_unit(tiny_clip)))
        restored[s] = naive_vision_grid(tiny_clip, image, image, "resid", checked, [noise], rows=[2])[2]
    m_corr = sum(corrupted_runs) / S
    assert abs(a.corrupted_metric - m_corr) < 1e-4
    assert (a.site("resid")[2, checked] * a.denominator + m_corr - restored.mean(0)).abs().max() <= 1e-4
    # positions the noise never touched carry exactly zero effect where nothing has mixed yet (embedding row)
    untouched = [p for p in range(T) if p not in a.cue_positions]
    assert torch.all(a.site("resid")[0, untouched] == 0)


def test_vision_boolean_patch_mask_equals_index_list(tiny_clip):
    image = random_images(tiny_clip, 1)[0]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    kw = dict(tower="vision", image=image, corrupt="noise", samples=2)
    by_mask = patch(tiny_clip, TEXT, patches=mask, **kw)
    by_index = patch(tiny_clip, TEXT, patches=[1 * 4 + 2, 3 * 4 + 0], **kw)
    assert by_mask.cue_positions == [7, 13] and torch.equal(by_mask.values, by_index.values)


def test_vision_window_equals_naive_multi_layer_restore(tiny_clip):
    clean, corrupted = random_images(tiny_clip, 2, seed=3)
    res = patch(tiny_clip, TEXT, tower="vision", image=clean, corrupted_image=corrupted, sites=("mlp",), window=3,
                min_denominator=0)
    names = [hook_name("vision", "mlp_out", layer) for layer in range(3)]
    _, cache = tiny_clip.run_with_cache(images=clean[None], names_filter=names)
    p = 6  # row 2 (block 1) with a window of 3 restores blocks 0, 1, 2
    m = _image_logit(tiny_clip, corrupted, [_put(name, p, cache) for name in names], _text_unit(tiny_clip))
    assert abs(float(res.site("mlp")[2, p]) * res.denominator + res.corrupted_metric - m) <= 1e-4


def test_vision_margin_metric_and_batch_independence(tiny_clip):
    clean, corrupted = random_images(tiny_clip, 2, seed=4), random_images(tiny_clip, 2, seed=5)
    foil = "there is a pleural effusion."
    kw = dict(tower="vision", images=clean, corrupted_images=corrupted, metric="margin", foil=foil, min_denominator=0)
    together = patch(tiny_clip, TEXT, batch_size=2, **kw)
    alone = patch(tiny_clip, TEXT, batch_size=1, **kw)
    assert isinstance(together, list) and len(together) == 2
    for b, (x, y) in enumerate(zip(together, alone, strict=True)):
        logits = tiny_clip.logits(clean[b:b + 1], [TEXT, foil])[0]
        assert abs(x.clean_metric - float(logits[0] - logits[1])) < 1e-4 and x.metric == "margin"
        assert torch.allclose(x.values, y.values, atol=1e-5, equal_nan=True)


def test_vision_aggregate_aligns_patch_roles(tiny_clip):
    clean, corrupted = random_images(tiny_clip, 2, seed=6), random_images(tiny_clip, 2, seed=7)
    res = patch(tiny_clip, TEXT, tower="vision", images=clean, corrupted_images=corrupted, min_denominator=0)
    agg = aggregate(res, n_boot=20)
    assert agg.labels == res[0].labels and agg.grid == (4, 4) and agg.tower == "vision"
    assert torch.allclose(agg.values, torch.stack([r.values for r in res]).mean(0), atol=1e-6)
    other = patch(tiny_clip, TEXT, tower="vision", image=clean[0], corrupted_image=corrupted[0])
    other.grid = (2, 8)
    with pytest.raises(ValueError, match="share one patch grid"):
        aggregate([res[0], other])


def test_patch_grid_from_engine_result(tiny_clip, pair_results):
    clean, _, res = _pair(tiny_clip, pair_results)
    for site, rows in (("resid", [0, 1, 2, 3]), ("mlp", [1, 2, 3])):
        fig = plot.patch_grid(res, site=site)
        traces = [t for t in fig.data if isinstance(t, go.Heatmap)]
        assert [a.text for a in fig.layout.annotations] == [f"layer {'emb' if r == 0 else r}" for r in rows]
        for trace, r in zip(traces, rows, strict=True):
            np.testing.assert_allclose(np.asarray(trace.z), res.site(site)[r, 1:].reshape(4, 4).numpy(), rtol=1e-6)
        assert list(fig.layout.yaxis.range) == [3.5, -0.5] and list(fig.layout.xaxis.range) == [-0.5, 3.5]
    over = plot.patch_grid(res, image=clean, layers=[2])
    assert len(over.data) == 2 and over.data[0].colorscale[0][1].startswith("rgb")  # image underneath, then effects
    assert len(over.layout.shapes) == 0  # the pair differs in every patch: nothing singled out
    agg = aggregate([res, res], n_boot=10)
    assert len([t for t in plot.patch_grid(agg).data if isinstance(t, go.Heatmap)]) == 4
    noised = patch(tiny_clip, TEXT, tower="vision", image=clean, corrupt="noise", patches=[5], samples=1)
    fig = plot.patch_grid(noised, layers=[0, 3])
    boxes = [(s.x0, s.y0, s.xref) for s in fig.layout.shapes]
    assert boxes == [(0.5, 0.5, "x"), (0.5, 0.5, "x2")]  # patch 5 = (row 1, col 1), outlined in both panels


# -- bad input ----------------------------------------------------------------------------

def test_vision_bad_images(tiny_clip):
    clean, corrupted = random_images(tiny_clip, 2)
    bad = clean.clone()
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="image: images contain NaN or inf"):
        patch(tiny_clip, TEXT, tower="vision", image=bad, corrupted_image=corrupted)
    with pytest.raises(ValueError, match="corrupted_image: images contain NaN or inf"):
        patch(tiny_clip, TEXT, tower="vision", image=clean, corrupted_image=bad)
    with pytest.raises(ValueError, match=r"corrupted_image: images must have shape \(B, 3, 32, 32\); got \(1, 3, 16, 16\)"):
        patch(tiny_clip, TEXT, tower="vision", image=clean, corrupted_image=corrupted[:, :16, :16])
    with pytest.raises(ValueError, match="needs corrupted_image="):
        patch(tiny_clip, TEXT, tower="vision", image=clean)
    with pytest.raises(ValueError, match="needs image="):
        patch(tiny_clip, TEXT, tower="vision")
    with pytest.raises(ValueError, match="got 3 corrupted images for 2 examples; pass one, or one per example"):
        patch(tiny_clip, TEXT, tower="vision", images=random_images(tiny_clip, 2),
              corrupted_images=random_images(tiny_clip, 3))
    with pytest.raises(ValueError, match="image= takes one image; got a batch of 2"):
        patch(tiny_clip, TEXT, tower="vision", image=random_images(tiny_clip, 2), corrupt="noise")


def test_vision_bad_patches_and_arguments(tiny_clip):
    image = random_images(tiny_clip, 1)[0]
    kw = dict(tower="vision", image=image, corrupt="noise", samples=1)
    with pytest.raises(ValueError, match=r"patch indices \[16\] are out of range.*4x4 grid has patches 0..15"):
        patch(tiny_clip, TEXT, patches=[3, 16], **kw)
    with pytest.raises(ValueError, match=r"out of range"):
        patch(tiny_clip, TEXT, patches=[-1], **kw)
    with pytest.raises(ValueError, match=r"mask must have the patch-grid shape \(4, 4\); got \(3, 4\)"):
        patch(tiny_clip, TEXT, patches=torch.ones(3, 4, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="selects no patch"):
        patch(tiny_clip, TEXT, patches=torch.zeros(4, 4, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="integer patch indices"):
        patch(tiny_clip, TEXT, patches=[0.5], **kw)
    with pytest.raises(ValueError, match="patches= selects patches to noise"):
        patch(tiny_clip, TEXT, tower="vision", image=image, corrupted_image=image, patches=[0])
    with pytest.raises(ValueError, match="corrupted= applies to the text tower.*corrupted_image="):
        patch(tiny_clip, TEXT, corrupted="there is a pleural effusion.", **kw)
    with pytest.raises(ValueError, match="patches= applies to the vision tower"):
        patch(tiny_clip, TEXT, image=image, patches=[0])
    with pytest.raises(ValueError, match="metric 'option_prob' is not available for the vision tower"):
        patch(tiny_clip, TEXT, metric="option_prob", **kw)
    with pytest.raises(ValueError, match="corrupt='substitute' is not available for the vision tower"):
        patch(tiny_clip, TEXT, tower="vision", image=image, corrupt="substitute")
    with pytest.raises(ValueError, match="unknown tower 'image'"):
        patch(tiny_clip, TEXT, tower="image", image=image)


def test_vision_tower_without_cls_plus_patches_layout_is_refused(tiny_clip, monkeypatch):
    image = random_images(tiny_clip, 1)[0]
    monkeypatch.setattr(tiny_clip.adapters["vision"], "grid", (2, 5))  # claims 10 patches; the tower has 16 + CLS
    with pytest.raises(NotImplementedError, match="exactly one class token.*17 positions"):
        patch(tiny_clip, TEXT, tower="vision", image=image, corrupt="noise", samples=1)
