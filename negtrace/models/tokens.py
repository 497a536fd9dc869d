"""Tokenization that remembers where every token came from.

Negation cues are found in the raw text (character offsets) and must be mapped to token
positions, so every tokenizer kind returns, next to the ids, each token's string and its
character span in the *original* text. Three kinds are supported: open_clip's byte-level
BPE (``SimpleTokenizer``, CLIP/CheXzero), open_clip's ``HFTokenizer`` wrapper (BiomedCLIP's
WordPiece) and any Hugging Face fast tokenizer (transformers ``CLIPModel``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Span = tuple[int, int] | None


@dataclass(frozen=True)
class Tokenized:
    """A batch of tokenized texts, padded to a common width.

    ``ids[b, t]`` is the id of token ``t`` of text ``b``; ``mask[b, t]`` is True for real
    tokens (special tokens included) and False for padding. ``tokens[b]`` and ``offsets[b]``
    list the string and character span (``None`` for special tokens) of each real token.
    ``pooled_index[b]`` is the position the tower pools (EOT for CLIP, CLS for BERT).
    """

    texts: list[str]
    ids: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    tokens: list[list[str]]
    offsets: list[list[Span]]
    pooled_index: Int[Tensor, " batch"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device | str) -> Tokenized:
        return Tokenized(self.texts, self.ids.to(device), self.mask.to(device), self.tokens,
                         self.offsets, self.pooled_index.to(device))


class ContextLengthError(ValueError):
    pass


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given: pass a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is a {type(t).__name__}, not a str")
        if not t.strip():
            raise ValueError(f"text {i} is empty or only whitespace; every text needs content")
    return texts


def _too_long(text: str, n_tokens: int, context_length: int) -> ContextLengthError:
    return ContextLengthError(
        f"text has {n_tokens} tokens (special tokens included) but the model's context length is "
        f"{context_length}: {text[:80]!r}{'...' if len(text) > 80 else ''}. Shorten it, or pass "
        f"truncate=True to cut it explicitly (the pooled EOT/SEP token is kept)."
    )


def _align_to_original(original: str, cleaned: str) -> list[int] | None:
    """Map each index of ``cleaned`` to an index of ``original``.

    The cleaning functions of CLIP tokenizers only collapse whitespace and change case, so
    the non-space characters of both strings correspond one to one. Returns None when they
    do not (e.g. ftfy repaired mojibake); callers then report offsets in the cleaned text.
    """
    orig_idx = [i for i, c in enumerate(original) if not c.isspace()]
    clean_idx = [i for i, c in enumerate(cleaned) if not c.isspace()]
    if len(orig_idx) != len(clean_idx):
        return None
    if any(original[o].lower() != cleaned[c].lower() for o, c in zip(orig_idx, clean_idx, strict=True)):
        return None
    mapping = [0] * (len(cleaned) + 1)
    for o, c in zip(orig_idx, clean_idx, strict=True):
        mapping[c] = o
    for c in range(len(cleaned)):  # spaces map to the char after the previous non-space one
        if cleaned[c].isspace():
            mapping[c] = mapping[c - 1] + 1 if c > 0 else 0
    mapping[len(cleaned)] = len(original.rstrip())
    return mapping


def _remap(spans: list[Span], mapping: list[int] | None) -> list[Span]:
    if mapping is None:
        return spans
    out: list[Span] = []
    for span in spans:
        if span is None:
            out.append(None)
        else:
            start, end = span
            out.append((mapping[start], mapping[end - 1] + 1 if end > start else mapping[start]))
    return out


def _pack(texts: list[str], id_lists: list[list[int]], token_lists: list[list[str]],
          offset_lists: list[list[Span]], context_length: int, pad_id: int,
          pooled: Callable[[list[int]], int]) -> Tokenized:
    ids = torch.full((len(texts), context_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), context_length), dtype=torch.bool)
    for b, row in enumerate(id_lists):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = True
    pooled_index = torch.tensor([pooled(row) for row in id_lists], dtype=torch.long)
    return Tokenized(texts, ids, mask, token_lists, offset_lists, pooled_index)


class BPETokenizer:
    """open_clip's byte-level BPE (``SimpleTokenizer``) with character offsets.

    Pools at the EOT token (CLIP's ``argmax`` rule: EOT has the largest id).
    """

    kind = "bpe"

    def __init__(self, tokenizer, context_length: int):
        self.tok = tokenizer
        self.context_length = context_length

    def _encode_with_spans(self, text: str) -> tuple[list[int], list[str], list[Span]]:
        tok = self.tok
        cleaned = tok.clean_fn(text)
        ids, strings, spans = [], [], []
        for match in tok.pat.finditer(cleaned):
            word = match.group(0)
            encoded = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            pos = match.start()
            for piece in tok.bpe(encoded).split(" "):
                ids.append(tok.encoder[piece])
                surface = bytearray(tok.byte_decoder[c] for c in piece.replace("</w>", "")).decode(
                    "utf-8", errors="replace")
                strings.append(surface)
                spans.append((pos, pos + len(surface)))
                pos += len(surface)
        return ids, strings, _remap(spans, _align_to_original(text, cleaned))

    def __call__(self, texts: str | Sequence[str], truncate: bool = False) -> Tokenized:
        texts = _check_texts(texts)
        sot, eot = self.tok.sot_token_id, self.tok.eot_token_id
        id_lists, token_lists, offset_lists = [], [], []
        for text in texts:
            ids, strings, spans = self._encode_with_spans(text)
            n = len(ids) + 2
            if n > self.context_length:
                if not truncate:
                    raise _too_long(text, n, self.context_length)
                keep = self.context_length - 2
                ids, strings, spans = ids[:keep], strings[:keep], spans[:keep]
            id_lists.append([sot, *ids, eot])
            token_lists.append(["<start_of_text>", *strings, "<end_of_text>"])
            offset_lists.append([None, *spans, None])
        return _pack(texts, id_lists, token_lists, offset_lists, self.context_length, 0,
                     pooled=lambda row: len(row) - 1)


class HFTokenizer:
    """A Hugging Face fast tokenizer (WordPiece, BPE) with offsets.

    ``clean_fn`` reproduces a wrapper's text cleaning (open_clip's ``HFTokenizer`` collapses
    whitespace); ``pool`` says where the tower pools: ``"first"`` (CLS) or ``"eos"``.
    ``strip_sep`` replaces the SEP id with 0 as open_clip's wrapper does when asked.
    """

    kind = "hf"

    def __init__(self, tokenizer, context_length: int, pool: str, clean_fn=None, strip_sep: bool = False,
                 eos_token_id: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("negtrace needs a *fast* Hugging Face tokenizer (it reports character offsets)")
        self.tok = tokenizer
        self.context_length = context_length
        self.pool = pool
        self.clean_fn = clean_fn or (lambda s: s)
        self.strip_sep = strip_sep
        self.eos_token_id = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id

    def _pooled(self, row: list[int]) -> int:
        if self.pool == "first":
            return 0
        if self.pool == "argmax":
            return max(range(len(row)), key=row.__getitem__)
        return row.index(self.eos_token_id) if self.eos_token_id in row else len(row) - 1

    def __call__(self, texts: str | Sequence[str], truncate: bool = False) -> Tokenized:
        texts = _check_texts(texts)
        cleaned = [self.clean_fn(t) for t in texts]
        enc = self.tok(cleaned, return_offsets_mapping=True, add_special_tokens=True)
        special = set(self.tok.all_special_ids)
        id_lists, token_lists, offset_lists = [], [], []
        for text, clean, ids, offs in zip(texts, cleaned, enc["input_ids"], enc["offset_mapping"], strict=True):
            if len(ids) > self.context_length:
                if not truncate:
                    raise _too_long(text, len(ids), self.context_length)
                ids = ids[: self.context_length - 1] + ids[-1:]
                offs = offs[: self.context_length - 1] + offs[-1:]
            spans = [None if (i in special and s == e) else (s, e) for i, (s, e) in zip(ids, offs, strict=True)]
            if self.strip_sep and self.tok.sep_token_id is not None:
                ids = [0 if i == self.tok.sep_token_id else i for i in ids]
            id_lists.append(list(ids))
            token_lists.append([s.replace("</w>", "") for s in self.tok.convert_ids_to_tokens(list(ids))])
            offset_lists.append(_remap(spans, _align_to_original(text, clean)))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return _pack(texts, id_lists, token_lists, offset_lists, self.context_length, pad, pooled=self._pooled)
