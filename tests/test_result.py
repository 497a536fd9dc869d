"""CTEResult persistence and role-aligned aggregation."""

import torch
from conftest import random_images

from negtrace.patching.engine import patch
from negtrace.patching.result import QUANTMEYER_ROLES, CTEResult, aggregate

PROMPTS = ["there is no pleural effusion.", "there is no pneumothorax.", "there are no rib fractures."]


def test_save_load_roundtrip(tmp_path, tiny_clip):
    res = patch(tiny_clip, PROMPTS[0], image=random_images(tiny_clip, 1), sites=("resid", "mlp"), heads=True)
    res.save(tmp_path / "one")
    back = CTEResult.load(tmp_path / "one")
    assert torch.equal(torch.nan_to_num(back.values), torch.nan_to_num(res.values))
    assert torch.equal(back.head_values, res.head_values)
    assert back.labels == res.labels and back.cue_positions == res.cue_positions and back.sites == res.sites


def test_quantmeyer_rows_match_a_hand_computed_mean(tiny_clip):
    results = patch(tiny_clip, clean=PROMPTS, image=random_images(tiny_clip, 1))
    agg = aggregate(results, scheme="quantmeyer", n_boot=200)
    assert agg.labels == list(QUANTMEYER_ROLES)
    # "further subject tokens" = per-example mean over those tokens, then mean over examples
    expected = []
    for r in results:
        n_subject = len(r.labels) - 6
        cols = list(range(5, 5 + n_subject - 1))
        if cols:
            expected.append(r.site("resid")[:, cols].mean(-1))
    manual = torch.stack(expected).mean(0)
    got = agg.site("resid")[:, QUANTMEYER_ROLES.index("further subject tokens")]
    assert torch.allclose(got, manual, atol=1e-6)
    # the cue row ("a/some/no") averages the cue token of every example
    cue = torch.stack([r.site("resid")[:, 3] for r in results]).mean(0)
    assert torch.allclose(agg.site("resid")[:, 3], cue, atol=1e-6)
    lo, hi = agg.ci_low[0], agg.ci_high[0]
    finite = ~torch.isnan(lo)
    assert torch.all(lo[finite] <= agg.values[0][finite] + 1e-6) and torch.all(agg.values[0][finite] <= hi[finite] + 1e-6)
    assert int(agg.n[0]) == 3
