import math

import pytest
import torch
import torch.nn.functional as F

from negtrace.finetune.losses import clip_loss, combined_loss, mcq_loss


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _naive_clip(img, txt, neg, scale):
    """Per-example loop: -log softmax of the true pair, text side extended by every negative."""
    b = img.shape[0]
    cands = [txt[j] for j in range(b)] + [n for row in neg for n in row]
    i2t = t2i = 0.0
    for i in range(b):
        logits = [scale * float(img[i] @ c) for c in cands]
        i2t += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        logits = [scale * float(txt[i] @ img[j]) for j in range(b)]
        t2i += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return 0.5 * (i2t / b + t2i / b)


def test_clip_loss_with_hard_negatives_matches_loop():
    img, txt, neg = _unit(5, 8, seed=1), _unit(5, 8, seed=2), _unit(5, 2, 8, seed=3)
    got = clip_loss(img, txt, 10.0, negatives=neg)
    assert float(got) == pytest.approx(_naive_clip(img, txt, neg, 10.0), rel=1e-5)
    assert float(clip_loss(img, txt, 10.0)) == pytest.approx(_naive_clip(img, txt, [], 10.0), rel=1e-5)
    # a flat (m, d) list of negatives equals the same negatives per example
    assert float(clip_loss(img, txt, 10.0, negatives=neg.reshape(-1, 8))) == pytest.approx(float(got), rel=1e-6)
    # masked padding drops exactly those negatives
    mask = torch.tensor([[True, False]] * 5)
    masked = clip_loss(img, txt, 10.0, negatives=neg, negatives_mask=mask)
    assert float(masked) == pytest.approx(_naive_clip(img, txt, neg[:, :1], 10.0), rel=1e-5)


def test_hard_negatives_raise_loss_when_close_to_the_image():
    img, txt = _unit(4, 8, seed=4), _unit(4, 8, seed=5)
    near = img[:, None, :].clone()  # a negative identical to the image: the hardest possible
    assert float(clip_loss(img, txt, 5.0, negatives=near)) > float(clip_loss(img, txt, 5.0))


def test_mcq_loss_matches_loop_and_combined_weights():
    img, opts = _unit(3, 8, seed=6), _unit(3, 4, 8, seed=7)
    ans = torch.tensor([0, 3, 1])
    naive = 0.0
    for i in range(3):
        logits = [7.0 * float(img[i] @ o) for o in opts[i]]
        naive += -(logits[ans[i]] - math.log(sum(math.exp(x) for x in logits)))
    m = mcq_loss(img, opts, ans, 7.0)
    assert float(m) == pytest.approx(naive / 3, rel=1e-5)
    c = clip_loss(img, _unit(3, 8, seed=8), 7.0)
    total, parts = combined_loss(c, m, w_clip=0.5, w_mcq=2.0)
    assert float(total) == pytest.approx(0.5 * float(c) + 2.0 * float(m), rel=1e-6)
    assert parts["mcq"] == pytest.approx(float(m)) and parts["loss"] == pytest.approx(float(total))
    assert float(combined_loss(None, m)[0]) == pytest.approx(float(m))


def test_bad_inputs():
    img = _unit(3, 8)
    with pytest.raises(ValueError, match="answers must index"):
        mcq_loss(img, _unit(3, 4, 8), torch.tensor([0, 4, 1]), 1.0)
    with pytest.raises(ValueError, match=r"\(b, d\)"):
        clip_loss(img, _unit(2, 8), 1.0)
    with pytest.raises(ValueError, match="no loss term"):
        combined_loss(None, None)
