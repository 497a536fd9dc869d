"""Corruption strategies: how the negation cue is taken away from the clean input.

- ``pair``: an affirmative counterpart of equal token length ("no" -> "a", "without" ->
  "with"), built from the cue lexicon or given by the user as a foil (Quantmeyer et al.
  2024's paired counterfactuals).
- ``substitute``: the cue tokens replaced by one chosen token, everything else identical.
- ``noise``: Gaussian noise on the cue tokens' input embeddings, scale = k x the empirical
  std of the token-embedding matrix, k = 3 by default, S seeded samples (ROME, Meng et al.
  2022, §2.1 and Appendix B.1).

Every strategy keeps the token count, so the pooled position (EOT / CLS) never moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..models.tokens import Tokenized
from .cues import CueMatch, counterpart_candidates, make_affirmative, require_cue, token_positions

Corruption = Literal["pair", "substitute", "noise"]
CORRUPTIONS: tuple[str, ...] = ("pair", "substitute", "noise")


class PairLengthError(ValueError):
    pass


@dataclass
class PreparedText:
    """One clean text and its corrupted counterpart, aligned token for token."""

    clean: str
    corrupted: str
    clean_ids: list[int]
    corrupted_ids: list[int]
    tokens: list[str]
    cue_positions: list[int]
    subject_positions: list[int]
    noise_positions: list[int] = field(default_factory=list)  # token positions that get noise

    @property
    def first_difference(self) -> int:
        """First token position whose input differs between clean and corrupted."""
        if self.noise_positions:
            return min(self.noise_positions)
        diff = [i for i, (a, b) in enumerate(zip(self.clean_ids, self.corrupted_ids, strict=True)) if a != b]
        if not diff:
            raise ValueError(f"clean and corrupted texts tokenize identically: {self.clean!r}")
        return diff[0]


def _real_ids(tok: Tokenized, b: int = 0) -> list[int]:
    return tok.ids[b, : int(tok.mask[b].sum())].tolist()


def _positions(tok: Tokenized, span: tuple[int, int]) -> list[int]:
    return token_positions(span, tok.offsets[0])


def _length_error(clean: str, corrupted: str, n_clean: int, n_corr: int, tried: list[str]) -> PairLengthError:
    hint = f" (tried counterparts {tried})" if tried else ""
    return PairLengthError(
        f"paired texts must have the same number of tokens so the pooled position does not move: "
        f"{clean!r} has {n_clean}, {corrupted!r} has {n_corr}{hint}. Pass a foil of equal token length "
        f"(corrupted=...), or use corrupt='substitute' or corrupt='noise', which keep the length by construction."
    )


def prepare(tokenize, clean: str, corrupt: Corruption = "pair", corrupted: str | None = None,
            replacement: str = "the", lexicon=None) -> PreparedText:
    """Align ``clean`` with its corruption under ``tokenize`` (a :class:`Tokenizer`)."""
    if corrupt not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corrupt!r}; choose one of {CORRUPTIONS}")
    tok = tokenize([clean])
    ids = _real_ids(tok)
    matches: list[CueMatch] = []
    if corrupted is None or corrupt != "pair":
        matches = require_cue(clean, lexicon)
    cue_pos = sorted({p for m in matches for p in _positions(tok, m.span)})
    subj_pos = sorted({p for m in matches for p in _positions(tok, m.subject_span)} - set(cue_pos))
    strings = tok.tokens[0]

    if corrupt == "pair":
        if corrupted is not None:
            ctok = tokenize([corrupted])
            cids = _real_ids(ctok)
            if len(cids) != len(ids):
                raise _length_error(clean, corrupted, len(ids), len(cids), [])
            if not cue_pos:  # user foil: the cue is wherever the two differ
                cue_pos = [i for i, (a, b) in enumerate(zip(ids, cids, strict=True)) if a != b]
                found = _safe_cues(clean, lexicon)
                subj_pos = sorted({p for m in found for p in _positions(tok, m.subject_span)} - set(cue_pos))
            return PreparedText(clean, corrupted, ids, cids, strings, cue_pos, subj_pos)
        return _auto_pair(tokenize, clean, tok, ids, matches, cue_pos, subj_pos)

    if corrupt == "substitute":
        sub = tokenize([replacement])
        sub_ids = _real_ids(sub)
        inner = [i for i, span in enumerate(sub.offsets[0]) if span is not None]
        if len(inner) != 1:
            raise ValueError(f"replacement {replacement!r} must be exactly one token; it is {len(inner)}")
        cids = list(ids)
        for p in cue_pos:
            cids[p] = sub_ids[inner[0]]
        return PreparedText(clean, f"<{replacement} substituted for the cue>", ids, cids, strings, cue_pos, subj_pos)

    return PreparedText(clean, "<noise on the cue embeddings>", ids, list(ids), strings, cue_pos, subj_pos,
                        noise_positions=list(cue_pos))


def _safe_cues(text: str, lexicon) -> list[CueMatch]:
    from .cues import find_cues

    return find_cues(text, lexicon)


def _auto_pair(tokenize, clean: str, tok: Tokenized, ids: list[int], matches: list[CueMatch],
               cue_pos: list[int], subj_pos: list[int]) -> PreparedText:
    text, tried = clean, []
    # Flip from the last cue backwards so earlier character offsets stay valid.
    for match in sorted(matches, key=lambda m: m.start, reverse=True):
        for candidate in counterpart_candidates(match, text):
            flipped, _ = make_affirmative(text, match, candidate, fix_article=True)
            tried.append(candidate)
            if len(_real_ids(tokenize([flipped]))) == len(ids):
                text = flipped
                break
        else:
            raise _length_error(clean, text, len(ids), len(_real_ids(tokenize([text]))), tried)
    cids = _real_ids(tokenize([text]))
    return PreparedText(clean, text, ids, cids, tok.tokens[0], cue_pos, subj_pos)


def embedding_noise_std(embedding_weight: Tensor) -> float:
    """Empirical std of all entries of the token-embedding matrix (ROME's noise unit)."""
    return float(embedding_weight.detach().float().std())


def noise_tensor(shape: tuple[int, ...], positions: list[list[int]], samples: int, scale: float,
                 generator: torch.Generator) -> Tensor:
    """(B * S, T, D) Gaussian noise, nonzero only at each example's ``positions``; row b*S + s."""
    b, t, d = shape
    noise = torch.zeros(b * samples, t, d)
    for i, pos in enumerate(positions):
        if pos:
            draw = torch.randn(samples, len(pos), d, generator=generator) * scale
            noise[i * samples:(i + 1) * samples, pos] = draw
    return noise
