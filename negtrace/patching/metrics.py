"""Contrastive metrics m(.) of a patched embedding, computed in float32.

A metric is built once per sweep with the fixed "other side" (image embeddings for the
text tower, text embeddings for the vision tower), then called on batches of patched
embeddings together with the example index of each row.

- ``logit``: CLIP's image–text logit, logit_scale * cos(anchor, e) (default with images).
- ``margin``: caption–foil margin, logit(image, e) - logit(image, foil), the foil being a
  fixed text per example (its logit is a constant of the sweep).
- ``option_prob``: probability of the patched text among candidate texts for the image,
  softmax over [e, candidates...] of the logits.
- ``cosine``: cosine to the clean embedding (the default with no image: text-only tracing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

METRICS = ("logit", "margin", "option_prob", "cosine")


@dataclass
class Metric:
    name: str
    anchor: Float[Tensor, "n_ex embed"]  # unit vectors
    scale: float = 1.0
    offset: Tensor | None = None  # (n_ex,) logit of each example's foil, margin only
    candidates: Tensor | None = None  # (n_ex, n_cand) logits of the other options, option_prob only

    def __call__(self, emb: Float[Tensor, "rows embed"], example: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        e = F.normalize(emb.float(), dim=-1)
        if self.name == "cosine":
            return (e * self.anchor[example]).sum(-1)
        logit = self.scale * (e * self.anchor[example]).sum(-1)
        if self.name == "logit":
            return logit
        if self.name == "margin":
            return logit - self.offset[example]
        others = self.candidates[example]
        return torch.softmax(torch.cat([logit[:, None], others], dim=1), dim=1)[:, 0]


def unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)
