"""Training losses: CLIP contrastive loss with negated hard negatives, and an MCQ loss.

* :func:`clip_loss` — the symmetric InfoNCE loss of CLIP (Radford et al. 2021) with extra
  text negatives appended to the text side, as in NegCLIP (Yuksekgonul et al. 2023): every
  image is contrasted with all captions of the batch *and* all hard negatives of the batch
  (e.g. the caption with its negations flipped), while the text->image direction is the
  plain CLIP one (a hard negative has no image of its own).
* :func:`mcq_loss` — cross-entropy over an item's options' logits (NegBench, Alhamoud et
  al. 2025): the image must score its correct option above the others.
* :func:`combined_loss` — ``w_clip * clip + w_mcq * mcq`` with a breakdown.

All inputs are L2-normalised embeddings; logits are ``logit_scale * cosine`` in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["clip_loss", "mcq_loss", "combined_loss"]


def clip_loss(image: Float[Tensor, "b d"], text: Float[Tensor, "b d"], logit_scale: Tensor | float,
              negatives: Float[Tensor, "b k d"] | Float[Tensor, "m d"] | None = None,
              negatives_mask: Bool[Tensor, "b k"] | None = None) -> Tensor:
    """Mean of image->text and text->image cross-entropy; image i's caption is text i.

    ``negatives[i, j]`` is the j-th hard negative made from example i; it is a candidate
    for *every* image of the batch (NegCLIP). ``negatives_mask`` (True = real) drops padding.
    A 2-D ``negatives`` (m, d) is an already flattened list of negatives.
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (b, d); got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    b = image.shape[0]
    image, text = image.float(), text.float()
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image.device)
    candidates = text
    if negatives is not None and negatives.numel():
        if not (negatives.ndim == 2 or (negatives.ndim == 3 and negatives.shape[0] == b)):
            raise ValueError(f"negatives must be (b={b}, k, d) or (m, d); got {tuple(negatives.shape)}")
        flat = negatives.float().reshape(-1, negatives.shape[-1])
        if negatives_mask is not None:
            flat = flat[negatives_mask.reshape(-1).to(flat.device)]
        candidates = torch.cat([text, flat])
    targets = torch.arange(b, device=image.device)
    i2t = scale * image @ candidates.T
    t2i = scale * text @ image.T
    return 0.5 * (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets))


def mcq_loss(image: Float[Tensor, "b d"], options: Float[Tensor, "b k d"], answer: Int[Tensor, " b"],
             logit_scale: Tensor | float) -> Tensor:
    """Mean cross-entropy of the correct option among the item's options."""
    if options.ndim != 3 or options.shape[0] != image.shape[0]:
        raise ValueError(f"options must be (b={image.shape[0]}, k, d); got {tuple(options.shape)}")
    if answer.shape != (image.shape[0],):
        raise ValueError(f"answer must be (b={image.shape[0]},); got {tuple(answer.shape)}")
    if (answer < 0).any() or (answer >= options.shape[1]).any():
        raise ValueError(f"answers must index one of the {options.shape[1]} options; got {answer.tolist()}")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=image.device)
    logits = scale * torch.einsum("bd,bkd->bk", image.float(), options.float())
    return F.cross_entropy(logits, answer.to(image.device))


def combined_loss(clip: Tensor | None, mcq: Tensor | None, w_clip: float = 1.0,
                  w_mcq: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """``w_clip * clip + w_mcq * mcq`` (missing terms skipped) and a float breakdown for logs."""
    terms = [(w, t, name) for w, t, name in ((w_clip, clip, "clip"), (w_mcq, mcq, "mcq")) if t is not None and w]
    if not terms:
        raise ValueError("no loss term: the batch has neither captions (clip) nor options (mcq), or both weights are 0")
    total = sum(w * t for w, t, _ in terms)
    parts = {name: float(t.detach()) for _, t, name in terms}
    parts["loss"] = float(total.detach())
    return total, parts
