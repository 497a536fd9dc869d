"""``negtrace phantom build | train``: the phantom dataset and the embedded model trained on it.

Training is plain CLIP (Radford et al. 2021): symmetric InfoNCE between phantom images and
their report captions, learnable temperature, AdamW with linear warm-up and cosine decay. It
is seeded, logs JSONL, checkpoints atomically after every epoch and resumes from the last
checkpoint when run again with the same configuration. The final weights are written in fp16
(the shipped size), reloaded, and the metrics in ``config.json`` and the model card are
measured on exactly those weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.findings import FINDINGS
from ..evaluate import _json_safe
from ..models.tokens import Tokenized
from ..patching.result import _atomic
from .phantom import (
    ARCHS,
    CONFIG_FILE,
    PHANTOM_ARCH,
    WEIGHTS_FILE,
    build_clip,
    normalize_uint8,
    sha256,
    weights_dir,
    wrap_clip,
)


@dataclass
class TrainConfig:
    data: str
    out: str
    work: str = "runs/phantom-train"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
    max_train: int | None = None
    max_steps: int | None = None
    shift_px: int = 8
    arch: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(PHANTOM_ARCH)))

    def digest(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("out", "work", "threads")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Split:
    images: Tensor  # (N, H, W) uint8
    captions: list[str]
    present: np.ndarray  # (N, 13) bool, FINDINGS order
    paths: list[str]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: is {path.parent} a folder written by `negtrace phantom build`?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_split(data: str | Path, split: str, limit: int | None = None, size: int | None = None) -> Split:
    """Images (uint8), captions and finding labels of one split of a phantom dataset."""
    from PIL import Image

    root = Path(data)
    reports = _read_jsonl(root / f"reports_{split}.jsonl")[:limit]
    attrs = {a["path"]: a for a in _read_jsonl(root / f"attributes_{split}.jsonl")}
    if not reports:
        raise ValueError(f"split {split!r} of {root} is empty")
    images, present = [], np.zeros((len(reports), len(FINDINGS)), dtype=bool)
    for i, rec in enumerate(reports):
        with Image.open(root / rec["path"]) as im:
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                raise ValueError(f"{root / rec['path']} is {im.size[0]}x{im.size[1]} px; the model takes "
                                 f"{size}x{size}: rebuild the dataset with --size {size}")
            images.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        for name in attrs[rec["path"]]["findings"]:
            present[i, FINDINGS.index(name)] = True
    return Split(torch.stack(images), [r["caption"] for r in reports], present, [r["path"] for r in reports])


def tokenize_all(model, texts: list[str]) -> Tensor:
    """(N, context) BPE ids, truncated with the EOT kept (open_clip's own tokenizer rule)."""
    return model.tokenizer(texts, truncate=True).ids


def text_batch(ids: Tensor) -> Tokenized:
    """Trim a batch of padded ids to its longest text (causal tower: padding cannot reach EOT)."""
    pooled = ids.argmax(-1)
    t = int(pooled.max()) + 1
    ids = ids[:, :t]
    return Tokenized([""] * ids.shape[0], ids, ids != 0, [], [], pooled)


def augment(images: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``shift`` px (edge-replicated), one offset per image."""
    if shift <= 0:
        return images
    b, h, w = images.shape
    padded = F.pad(images[:, None].float(), (shift,) * 4, mode="replicate")[:, 0]
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols].round().to(torch.uint8)


def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def embed_split(model, split: Split, ids: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    img, txt = [], []
    for i in range(0, len(split.captions), batch_size):
        img.append(model.encode_image(normalize_uint8(split.images[i:i + batch_size]), normalize=True))
        txt.append(model.encode_text(text_batch(ids[i:i + batch_size]), normalize=True))
    return torch.cat(img), torch.cat(txt)


def _atomic_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def _log(work: Path, record: dict) -> None:
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train the phantom CLIP; write fp16 weights, config and model card to ``cfg.out``."""
    from tqdm.auto import tqdm

    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    model = build_clip(cfg.arch)
    hooked = wrap_clip(model, cfg.arch, name="phantom")
    size = cfg.arch["vision_cfg"]["image_size"]
    train_split = load_split(cfg.data, "train", cfg.max_train, size)
    val_split = load_split(cfg.data, "val", None, size)
    if len(train_split.captions) < cfg.batch_size:
        raise ValueError(f"{len(train_split.captions)} training images is fewer than one batch of {cfg.batch_size}")
    train_ids, val_ids = tokenize_all(hooked, train_split.captions), tokenize_all(hooked, val_split.captions)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    n = len(train_split.captions)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)

    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    step, start_epoch = 0, 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["digest"] != cfg.digest():
            raise ValueError(f"{ckpt_path} belongs to a different training configuration; use another --work "
                             "folder or delete it to start over")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, start_epoch = ckpt["step"], ckpt["epoch"]
        print(f"[phantom train] resuming at epoch {start_epoch}, step {step}", file=sys.stderr)
    else:
        (work / "log.jsonl").unlink(missing_ok=True)

    bar = tqdm(total=total, initial=step, disable=not progress, desc="phantom train", unit="step")
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total:
            break
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        t_epoch = time.perf_counter()
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            images = normalize_uint8(augment(train_split.images[idx], cfg.shift_px, g))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            loss = clip_loss(hooked.encode_image(images), hooked.encode_text(text_batch(train_ids[idx])),
                             model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.detach():.3f}")
                _log(work, {"step": step, "epoch": epoch, "loss": float(loss), "lr": opt.param_groups[0]["lr"],
                            "logit_scale": float(model.logit_scale.exp())})
        model.eval()
        val = _val_metrics(hooked, val_split, val_ids)
        model.train()
        _log(work, {"step": step, "epoch": epoch, "epoch_seconds": time.perf_counter() - t_epoch, **val})
        ckpt = {"digest": cfg.digest(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "epoch": epoch + 1}
        _atomic(ckpt_path, lambda tmp, ckpt=ckpt: torch.save(ckpt, tmp))
    bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    return export(model, cfg, seconds, n_train=n, steps=step)


@torch.inference_mode()
def _val_metrics(hooked, split: Split, ids: Tensor) -> dict[str, float]:
    from ..alignment import retrieval_recall

    img, txt = embed_split(hooked, split, ids)
    loss = clip_loss(img, txt, hooked.model.logit_scale)
    return {"val_loss": float(loss), **{f"val_{k}": v for k, v in retrieval_recall(img, txt).items()}}


def complete_labels(table):
    """The phantom's full ground truth: every finding not rendered is absent (0), not blank.

    The label CSV keeps CheXpert's convention (blank = not mentioned in the report), so the
    MCQ filter (>= 3 absent findings) would keep almost no study; a phantom's absences are
    known, so the benchmark may use them all."""
    from dataclasses import replace

    from ..data.findings import PRESENT

    values = table.values.copy()
    findings = values[:, 1:]
    findings[findings != PRESENT] = 0
    return replace(table, values=values)


def evaluate_phantom(hooked, data: str | Path, split: str = "test", mcq: bool = True,
                     progress: bool = False) -> dict[str, Any]:
    """Zero-shot finding AUC, image-report retrieval and polarity MCQ accuracy on a phantom split."""
    from ..alignment import retrieval_recall, zero_shot_auc

    size = hooked.image_size[0]
    s = load_split(data, split, None, size)
    ids = tokenize_all(hooked, s.captions)
    img, txt = embed_split(hooked, s, ids)
    out: dict[str, Any] = {"split": split, "n": len(s.captions),
                           "zero_shot_auc": zero_shot_auc(hooked, img, s.present),
                           "zero_shot_auc_positive_prompt": zero_shot_auc(hooked, img, s.present, mode="positive"),
                           "retrieval": retrieval_recall(img, txt),
                           "distinct_captions": len(set(s.captions))}
    if mcq:
        from ..data.labels import read_labels
        from ..data.polarity import NoEligibleStudiesError, build_polarity
        from ..evaluate import evaluate_polarity

        try:
            bench = build_polarity(complete_labels(read_labels(Path(data) / f"labels_{split}.csv")), seed=0)
        except NoEligibleStudiesError as exc:
            out["polarity_mcq"] = {"skipped": str(exc)}
            return out
        by_path = dict(zip(s.paths, img, strict=True))
        embeds = {item.study_id: by_path[item.image_path] for item in bench.items}
        out["polarity_mcq"] = evaluate_polarity(hooked, bench.items, image_embeddings=embeds, progress=progress)
    return out


def export(model, cfg: TrainConfig, seconds: float, n_train: int, steps: int) -> dict[str, Any]:
    """Write fp16 weights, measure on exactly those weights, write config.json and the model card."""
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    _atomic(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    config: dict[str, Any] = {
        "family": "open_clip", "arch": cfg.arch, "sha256": sha256(out / WEIGHTS_FILE), "dtype": "float16",
        "training": {**{k: v for k, v in asdict(cfg).items() if k not in ("arch", "out", "work")},
                     "n_train": n_train, "steps": steps, "seconds": round(seconds, 1),
                     "torch": torch.__version__, "machine": platform.machine(),
                     "command": "negtrace phantom train " + _cli_args(cfg)},
    }
    _atomic_text(out / CONFIG_FILE, json.dumps(config, indent=2))
    return measure(out, cfg.data)


def measure(folder: str | Path, data: str | Path) -> dict[str, Any]:
    """Evaluate the weights in ``folder`` on the test split of ``data``; record the metrics in
    its ``config.json`` and rewrite its model card. The weights are not touched."""
    from .phantom import load_phantom, read_config

    out = Path(folder)
    config = read_config(out)
    metrics = evaluate_phantom(load_phantom("phantom", folder=out), data, "test")
    config["metrics"] = {"data": str(data), **_json_safe(metrics)}
    _atomic_text(out / CONFIG_FILE, json.dumps(config, indent=2))
    _atomic_text(out / "README.md", model_card(config))
    return config


def _cli_args(cfg: TrainConfig) -> str:
    defaults = TrainConfig(data="", out="")
    parts = [f"--data {cfg.data}", f"--out {cfg.out}"]
    parts += [f"--arch {name}" for name, arch in ARCHS.items() if arch == cfg.arch and name != "phantom"]
    for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "max_train", "max_steps",
              "shift_px"):
        if getattr(cfg, k) != getattr(defaults, k):
            parts.append(f"--{k.replace('_', '-')} {getattr(cfg, k)}")
    return " ".join(parts)


def model_card(config: dict[str, Any]) -> str:
    arch, tr, m = config["arch"], config["training"], config.get("metrics", {})
    auc, auc_pos = m.get("zero_shot_auc", {}), m.get("zero_shot_auc_positive_prompt", {})

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "n/a"

    rows = "\n".join(f"| {k} | {cell(v)} | {cell(auc_pos.get(k))} |" for k, v in auc.items())
    ret = m.get("retrieval", {})
    mcq = m.get("polarity_mcq", {})

    def acc(key: str) -> str:
        entry = mcq.get(key) or {}
        if not isinstance(entry, dict) or "value" not in entry:
            return "n/a"
        low, high = entry["ci"]
        return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"

    return f"""# negtrace embedded model: `phantom`

**Intended use: testing and teaching negtrace. Not a medical device; never use it on patients.**
It was trained only on procedural phantoms, not on radiographs.

## Architecture
open_clip `CLIP`, CheXzero-like in shape but small: ViT vision tower ({arch['vision_cfg']['layers']} blocks,
width {arch['vision_cfg']['width']}, {arch['vision_cfg']['patch_size']} px patches on
{arch['vision_cfg']['image_size']} px images), causal text transformer ({arch['text_cfg']['layers']} blocks,
width {arch['text_cfg']['width']}, {arch['text_cfg']['context_length']} tokens, open_clip BPE vocabulary),
QuickGELU, joint embedding {arch['embed_dim']}. Weights stored in fp16 (`model.safetensors`,
sha256 `{config['sha256'][:16]}…`); loaded in fp32.

## Training data
`negtrace phantom build` (seeded procedural chest-radiograph phantoms, 13 CheXpert findings with
prevalences and co-occurrences fitted to CheXpert's label statistics) and report-style captions
written by `negtrace.data.reports` (present findings with attributes; absent findings stated with
varied negation, as real reports do). {tr['n_train']} training images. The dataset of these
weights is `negtrace phantom build --out DATA` with its defaults (16000 / 500 / 1000 images,
224 px, seed 0); rendering is deterministic, so it is the same on every machine.

## Training
Command: `{tr['command']}` (seed {tr['seed']}, {tr['steps']} steps, batch {tr['batch_size']},
AdamW lr {tr['lr']}, cosine schedule, {tr['seconds']:.0f} s on {tr['threads']} CPU threads,
torch {tr['torch']}). CLIP contrastive loss only; the captions were not edited to create or hide
negation failures.

## Metrics (held-out phantom test split, n = {m.get('n', 'n/a')}, measured on the shipped fp16 weights)
Zero-shot AUC, scored two ways: the CheXzero prompt pair (softmax over "{{finding}}." vs
"no {{finding}}.", which needs the model to read "no") and the positive prompt alone (similarity
to "{{finding}}."). Where the pair is much worse than the positive prompt, the negation is what fails.

| finding | AUC, prompt pair | AUC, positive prompt |
|---|---|---|
{rows}

Image→report retrieval R@1 {ret.get('image_to_text_R@1', float('nan')):.3f}, R@5 {ret.get('image_to_text_R@5', float('nan')):.3f};
report→image R@1 {ret.get('text_to_image_R@1', float('nan')):.3f}, R@5 {ret.get('text_to_image_R@5', float('nan')):.3f}
({m.get('distinct_captions', 'n/a')} distinct captions among {m.get('n', 'n/a')} reports).

Polarity MCQ (negated options vs affirmative equivalents; accuracy with 95% bootstrap CI):
negated {acc('accuracy_negated')}, affirmative {acc('accuracy_affirmative')}, gap {acc('gap')}.

## Limitations
Phantoms are simplified anatomy; findings are rendered geometrically. Effects measured on this
model say how *this* model treats negation, which is what negtrace's tests and tutorials need.
"""


# -- command line ------------------------------------------------------------------------------

def configure_phantom(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="phantom_command", required=True)
    b = sub.add_parser("build", help="render a phantom dataset (PNG + CheXpert-style labels + reports)")
    b.add_argument("--out", required=True)
    b.add_argument("--n-train", type=int, default=16000)
    b.add_argument("--n-val", type=int, default=500)
    b.add_argument("--n-test", type=int, default=1000)
    b.add_argument("--size", type=int, default=224)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(phantom_func=_run_build)
    t = sub.add_parser("train", help="train the embedded phantom CLIP on a phantom dataset")
    t.add_argument("--data", required=True, help="folder written by `negtrace phantom build`")
    t.add_argument("--out", default=str(weights_dir("phantom")), help="where the weights, config and card go")
    t.add_argument("--work", default="runs/phantom-train", help="checkpoints and log (resumable)")
    defaults = TrainConfig(data="", out="")
    for name in ("epochs", "batch_size", "warmup_steps", "seed", "threads", "max_train", "max_steps", "shift_px"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay"):
        t.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    t.add_argument("--arch", default="phantom", choices=sorted(ARCHS), help="architecture preset")
    t.set_defaults(phantom_func=_run_train)
    e = sub.add_parser("eval", help="re-measure a trained phantom model; updates its config.json and model card")
    e.add_argument("--data", required=True, help="folder written by `negtrace phantom build`")
    e.add_argument("--model-dir", default=str(weights_dir("phantom")))
    e.set_defaults(phantom_func=_run_eval)


def run_phantom(args: argparse.Namespace) -> int:
    return args.phantom_func(args)


def _run_build(args) -> int:
    from ..data.phantom import build_phantom_dataset

    summary = build_phantom_dataset(args.out, args.n_train, args.n_val, args.n_test, size=args.size, seed=args.seed)
    print(summary)
    return 0


def _run_eval(args) -> int:
    m = measure(args.model_dir, args.data)["metrics"]
    print(json.dumps({"zero_shot_auc_mean": m["zero_shot_auc"]["mean"], **m["retrieval"]}, indent=1))
    return 0


def _run_train(args) -> int:
    keys = TrainConfig.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in keys and k != "arch"}
    cfg = TrainConfig(**given, arch=json.loads(json.dumps(ARCHS[args.arch])))
    config = train(cfg)
    m = config["metrics"]
    print(json.dumps({"zero_shot_auc_mean": m["zero_shot_auc"]["mean"], **m["retrieval"]}, indent=1))
    print(f"weights, config.json and README.md written to {cfg.out}")
    return 0
