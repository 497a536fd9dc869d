"""The batched engine against a naive per-cell loop over the full, unmodified model."""

import pytest
import torch
from conftest import random_images

from negtrace.models.sites import hook_name
from negtrace.patching.engine import patch

TEXTS = ["there is no pleural effusion.", "lungs are clear without consolidation."]


def _naive_metric(model, text, image, hooks):
    return float(model.run_with_hooks(texts=[text], images=image[None], fwd_hooks=hooks)[0, 0])


def _site_name(site, row):
    if site == "resid":
        return hook_name("text", "resid_pre", 0) if row == 0 else hook_name("text", "resid_post", row - 1)
    return hook_name("text", {"attn": "attn_out", "mlp": "mlp_out"}[site], row - 1)


def naive_grid(model, clean, corrupted, image, site):
    """One full forward of the corrupted text per (layer, position), one hook each."""
    L = model.n_layers("text")
    n = int(model.tokenize([clean]).mask.sum())
    names = [_site_name(site, r) for r in range(L + 1) if site == "resid" or r > 0]
    _, cache = model.run_with_cache(texts=[clean], names_filter=names)
    m_clean = _naive_metric(model, clean, image, [])
    m_corr = _naive_metric(model, corrupted, image, [])
    grid = torch.full((L + 1, n), float("nan"))
    for row in range(L + 1):
        if site != "resid" and row == 0:
            continue
        name = _site_name(site, row)
        for p in range(n):
            def put(x, hook, p=p, name=name):
                x = x.clone()
                x[0, p] = cache[name][0, p]
                return x
            grid[row, p] = _naive_metric(model, corrupted, image, [(name, put)])
    return (grid - m_corr) / (m_clean - m_corr), m_clean, m_corr


@pytest.mark.parametrize("direction", ["restore_negation", "restore_affirmation"])
def test_engine_equals_naive_loop(any_family, direction):
    image = random_images(any_family, 1)[0]
    results = patch(any_family, clean=TEXTS, image=image, sites=("resid", "attn", "mlp"), direction=direction,
                    min_denominator=0)
    for res in results:
        clean, corrupted = res.text, res.corrupted_text
        for site in ("resid", "attn", "mlp"):
            expected, m_clean, m_corr = naive_grid(any_family, clean, corrupted, image, site)
            got = res.site(site)
            assert abs(res.clean_metric - m_clean) < 1e-4 and abs(res.corrupted_metric - m_corr) < 1e-4
            mask = ~torch.isnan(expected)
            assert torch.equal(mask, ~torch.isnan(got)), site
            # compare effects (unnormalised) at 1e-4, as the issue asks; CTE divides by the denominator
            denom = m_clean - m_corr
            assert ((got[mask] - expected[mask]) * denom).abs().max() <= 1e-4, (site, clean)


def test_restore_all_at_embedding_is_clean_and_none_is_corrupted(tiny_clip):
    image = random_images(tiny_clip, 1)
    res = patch(tiny_clip, "there is no pleural effusion.", image=image)
    clean_ids = tiny_clip.tokenize([res.text]).ids
    corr_ids = tiny_clip.tokenize([res.corrupted_text]).ids
    differ = (clean_ids != corr_ids)[0].nonzero().flatten().tolist()
    assert differ == res.cue_positions
    # restoring every differing position at layer 0 restores the whole clean input: CTE 1
    assert torch.allclose(res.site("resid")[0, differ], torch.ones(len(differ)), atol=1e-5)
    # restoring nothing: the hooked run with identity hooks is the corrupted metric
    corr = tiny_clip.logits(image, [res.corrupted_text])[0, 0]
    assert abs(float(corr) - res.corrupted_metric) < 1e-5
    # the pooled position at the last layer carries the whole output
    assert abs(float(res.site("resid")[-1, -1]) - 1.0) < 1e-5


def test_positions_before_first_corrupted_token_are_exactly_zero_in_causal_towers(tiny_clip, tiny_hf_clip):
    image = random_images(tiny_clip, 1)
    for model in (tiny_clip, tiny_hf_clip):
        res = patch(model, "there is no pleural effusion.", image=random_images(model, 1), sites=("resid", "mlp"))
        first = min(res.cue_positions)
        assert torch.all(res.site("resid")[:, :first] == 0)
        assert torch.all(res.site("mlp")[1:, :first] == 0)
    del image


def test_bidirectional_tower_sweeps_every_position(tiny_biomedclip):
    res = patch(tiny_biomedclip, "there is no pleural effusion.", image=random_images(tiny_biomedclip, 1))
    assert res.site("resid")[1:, 0].abs().max() > 0  # CLS before the cue still carries an effect


def test_heads_equal_naive_loop(tiny_clip):
    image = random_images(tiny_clip, 1)[0]
    res = patch(tiny_clip, "there is no pleural effusion.", image=image, heads=True)
    _, cache = tiny_clip.run_with_cache(texts=[res.text], names_filter=lambda n: n.endswith("hook_z"))
    m_corr, m_clean = res.corrupted_metric, res.clean_metric
    for layer in range(tiny_clip.n_layers("text")):
        name = hook_name("text", "z", layer)
        for h in range(tiny_clip.n_heads("text")):
            def put(z, hook, h=h, name=name):
                z = z.clone()
                z[0, :, h] = cache[name][0, :, h]
                return z
            m = _naive_metric(tiny_clip, res.corrupted_text, image, [(name, put)])
            assert abs((m - m_corr) / (m_clean - m_corr) - float(res.head_values[layer, h])) * abs(m_clean - m_corr) < 1e-4


def test_rome_window_equals_naive_multi_layer_restore(tiny_clip):
    image = random_images(tiny_clip, 1)[0]
    res = patch(tiny_clip, "there is no pleural effusion.", image=image, sites=("mlp",), window=3)
    names = [hook_name("text", "mlp_out", layer) for layer in range(4)]
    _, cache = tiny_clip.run_with_cache(texts=[res.text], names_filter=names)
    layer, p = 2, res.cue_positions[0]  # window of 3 around block 2 (row 2 = block index 1)
    block = layer - 1
    hooks = []
    for b in (0, 1, 2):
        def put(x, hook, b=b):
            x = x.clone()
            x[0, p] = cache[names[b]][0, p]
            return x
        hooks.append((names[b], put))
    assert block == 1
    m = _naive_metric(tiny_clip, res.corrupted_text, image, hooks)
    cte = (m - res.corrupted_metric) / res.denominator
    assert abs(cte - float(res.site("mlp")[layer, p])) * abs(res.denominator) < 1e-4


def test_noise_is_seeded_and_mean_matches_per_sample_loop(tiny_clip):
    image = random_images(tiny_clip, 1)
    kw = dict(image=image, corrupt="noise", samples=4, seed=3)
    a = patch(tiny_clip, "there is no pleural effusion.", **kw)
    b = patch(tiny_clip, "there is no pleural effusion.", **kw)
    c = patch(tiny_clip, "there is no pleural effusion.", **{**kw, "seed": 4})
    assert torch.equal(a.values, b.values) and not torch.equal(a.values, c.values)
    # per-sample loop: same noise (same generator draws), one sample at a time
    from negtrace.negation.corrupt import embedding_noise_std, noise_tensor

    g = torch.Generator().manual_seed(3)
    t = len(tiny_clip.tokenize([a.text]).tokens[0])
    std = embedding_noise_std(tiny_clip.model.token_embedding.weight)
    noise = noise_tensor((1, t, 64), [a.cue_positions], 4, 3.0 * std, g)
    clean_cache = tiny_clip.run_with_cache(texts=[a.text], names_filter=[hook_name("text", "resid_post", 1)])[1]
    restored, corrupted = [], []
    for s in range(4):
        def add(x, hook, s=s):
            return x + torch.nn.functional.pad(noise[s], (0, 0, 0, x.shape[1] - t))

        def put(x, hook):
            x = x.clone()
            x[0, a.cue_positions[0]] = clean_cache[hook.name][0, a.cue_positions[0]]
            return x
        corrupted.append(_naive_metric(tiny_clip, a.text, image[0], [(hook_name("text", "embed"), add)]))
        restored.append(_naive_metric(tiny_clip, a.text, image[0], [(hook_name("text", "embed"), add),
                                                                     (hook_name("text", "resid_post", 1), put)]))
    m_corr = sum(corrupted) / 4
    assert abs(m_corr - a.corrupted_metric) < 1e-4
    cte = (sum(restored) / 4 - m_corr) / (a.clean_metric - m_corr)
    assert abs(cte - float(a.site("resid")[2, a.cue_positions[0]])) * abs(a.denominator) < 1e-4


def test_text_only_cosine_metric(tiny_clip):
    res = patch(tiny_clip, "there is no pleural effusion.")
    assert res.metric == "cosine" and abs(res.clean_metric - 1.0) < 1e-5


def test_margin_and_option_prob_metrics(tiny_clip):
    image = random_images(tiny_clip, 1)
    res = patch(tiny_clip, "there is no pleural effusion.", image=image, metric="margin",
                foil="there is no pneumothorax.")
    emb = tiny_clip.logits(image, [res.text, res.corrupted_text, "there is no pneumothorax."])[0]
    assert abs(res.clean_metric - float(emb[0] - emb[2])) < 1e-4
    res = patch(tiny_clip, "there is no pleural effusion.", image=image, metric="option_prob",
                candidates=[["there is a pneumothorax.", "the heart is enlarged."]])
    logits = tiny_clip.logits(image, [res.text, "there is a pneumothorax.", "the heart is enlarged."])[0]
    assert abs(res.clean_metric - float(torch.softmax(logits, 0)[0])) < 1e-5


# -- bad input ---------------------------------------------------------------------------

def test_no_cue_found(tiny_clip):
    with pytest.raises(ValueError, match="No negation cue found.*lexicon knows"):
        patch(tiny_clip, "there is a pleural effusion.")


def test_pair_length_mismatch(tiny_clip):
    with pytest.raises(ValueError, match="same number of tokens.*foil"):
        patch(tiny_clip, "no effusion.", corrupted="a large pleural effusion.")


def test_tiny_denominator_is_flagged_and_excluded(tiny_clip):
    from negtrace.patching.result import aggregate

    image = random_images(tiny_clip, 1)
    res = patch(tiny_clip, clean=TEXTS, image=image, min_denominator=1e6)
    assert all(r.flagged for r in res) and torch.isnan(res[0].values).all()
    with pytest.raises(ValueError, match="all 2 examples were flagged"):
        aggregate(res)
    ok = patch(tiny_clip, clean=TEXTS, image=image)
    agg = aggregate([*ok, res[0]])
    assert agg.n_excluded == 1


def test_nan_images(tiny_clip):
    image = random_images(tiny_clip, 1)
    image[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        patch(tiny_clip, "no pleural effusion.", image=image)


def test_mixed_lengths_batch_matches_one_by_one(tiny_clip):
    image = random_images(tiny_clip, 1)
    texts = ["no effusion.", "there is no evidence of a large left pleural effusion."]
    together = patch(tiny_clip, clean=texts, image=image)
    for text, res in zip(texts, together, strict=True):
        alone = patch(tiny_clip, text, image=image)
        assert alone.values.shape == res.values.shape
        assert torch.allclose(alone.values, res.values, atol=1e-4, equal_nan=True)


def test_empty_and_mismatched_inputs(tiny_clip):
    with pytest.raises(ValueError, match="no texts"):
        patch(tiny_clip, clean=[])
    with pytest.raises(ValueError, match="2 images for 1 texts"):
        patch(tiny_clip, "no effusion.", images=random_images(tiny_clip, 2))
    with pytest.raises(ValueError, match="unknown sites"):
        patch(tiny_clip, "no effusion.", sites=("resid_post",))
