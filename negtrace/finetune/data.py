"""Training examples for :mod:`negtrace.finetune.loop` from the formats negtrace reads.

An :class:`Example` is one image with a caption (for the contrastive loss), optional hard
negatives (NegCLIP-style: the caption with its negations flipped) and optional options with
an answer (for the MCQ loss). Sources (``kind``):

``polarity``  a polarity MCQ JSONL (``negtrace build polarity``): caption = the correct option
              (negated wording), options = the four negated-wording options, answer.
``phantom``   a phantom dataset folder (``build_phantom_dataset``): ``reports_{split}.jsonl``
              captions and ``{split}/.../*.png`` images; hard negative = caption with its
              negation cues flipped ("No pleural effusion." -> "A pleural effusion."), when it has cues.
``pairs``     a user CSV/JSONL with columns ``image``, ``caption`` and optionally
              ``negated_caption`` (image paths relative to the file or ``image_root``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Example", "flip_negations", "load_examples", "epoch_order", "ImageStore"]


@dataclass(frozen=True)
class Example:
    image: str | Tensor  # a file path or a preprocessed (3, H, W) tensor
    caption: str | None = None
    negatives: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    answer: int | None = None
    key: str = ""  # study id or row id, for logs

    def __post_init__(self) -> None:
        if self.caption is None and not self.options:
            raise ValueError(f"example {self.key!r} has neither a caption nor options; nothing to learn from")
        if self.options and (self.answer is None or not 0 <= self.answer < len(self.options)):
            raise ValueError(f"example {self.key!r}: answer {self.answer!r} does not index its "
                             f"{len(self.options)} options")


def flip_negations(text: str) -> str | None:
    """``text`` with every negation cue replaced by its affirmative counterpart, or None without cues."""
    from ..negation.cues import counterpart_candidates, find_cues, make_affirmative

    matches = find_cues(text)
    if not matches:
        return None
    for m in sorted(matches, key=lambda m: m.start, reverse=True):
        candidates = counterpart_candidates(m, text)
        if candidates:
            text, _ = make_affirmative(text, m, candidates[0], fix_article=True)
    return text


def _from_polarity(path: Path, image_root: Path | None) -> list[Example]:
    from ..data.schema import PolarityItem, read_jsonl

    items = read_jsonl(path, PolarityItem)
    root = image_root or path.parent
    out = []
    for item in items:
        if not item.image_path:
            raise ValueError(f"{path}: polarity item {item.item_id} has no image_path; training needs image files")
        out.append(Example(str(root / item.image_path), item.options_negated[item.answer], (),
                           tuple(item.options_negated), item.answer, item.item_id))
    return out


def _from_phantom(folder: Path, split: str) -> list[Example]:
    reports = folder / f"reports_{split}.jsonl"
    if not reports.is_file():
        raise FileNotFoundError(f"{folder} is not a phantom dataset folder with a {split!r} split "
                                f"({reports.name} missing); build one with negtrace.data.phantom.build_phantom_dataset")
    out = []
    for line in reports.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            neg = flip_negations(r["caption"])
            out.append(Example(str(folder / r["path"]), r["caption"], (neg,) if neg else (), key=r["study_id"]))
    return out


def _from_pairs(path: Path, image_root: Path | None) -> list[Example]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    root = image_root or path.parent
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in ("image", "caption") if not row.get(c)]
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {', '.join(missing)}; columns must be image, caption"
                             "[, negated_caption]")
        neg = row.get("negated_caption") or None
        out.append(Example(str(root / row["image"]), row["caption"], (neg,) if neg else (), key=str(i)))
    return out


def _first_kind(path: Path) -> str | None:
    with open(path) as f:
        line = f.readline()
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("kind") if isinstance(record, dict) else None


def load_examples(source: str | os.PathLike, kind: str = "auto", split: str = "train",
                  image_root: str | os.PathLike | None = None) -> list[Example]:
    """Read training examples; ``kind`` is guessed from the path when ``"auto"`` (see module doc)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    root = Path(image_root) if image_root else None
    if kind == "auto":
        if path.is_dir():
            kind = "phantom"
        else:
            kind = "polarity" if path.suffix.lower() == ".jsonl" and _first_kind(path) == "polarity" else "pairs"
    loaders = {"polarity": lambda: _from_polarity(path, root), "phantom": lambda: _from_phantom(path, split),
               "pairs": lambda: _from_pairs(path, root)}
    if kind not in loaders:
        raise ValueError(f"unknown data kind {kind!r}; use auto, polarity, phantom or pairs")
    examples = loaders[kind]()
    if not examples:
        raise ValueError(f"{path} holds no training examples")
    return examples


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation determined by (seed, epoch) only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


@dataclass
class ImageStore:
    """Preprocessed image tensors, cached by path (phantom and MCQ sets reuse images).

    At most ``max_cached`` images are kept (2048 x 3 x 224 x 224 float32 is about 1.2 GiB).
    """

    preprocess: object
    cache: bool = True
    max_cached: int = 2048
    _store: dict = field(default_factory=dict)

    def __call__(self, images: Sequence[str | Tensor]) -> Tensor:
        return torch.stack([self.one(x) for x in images])

    def one(self, image: str | Tensor) -> Tensor:
        if isinstance(image, Tensor):
            return image
        if image in self._store:
            return self._store[image]
        from ..evaluate import load_image

        if self.preprocess is None:
            raise ValueError("the model has no preprocess(); pass preprocessed image tensors")
        t = self.preprocess(load_image(image))
        if self.cache and len(self._store) < self.max_cached:
            self._store[image] = t
        return t
