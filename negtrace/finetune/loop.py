"""The fine-tuning loop: accumulation, clipping, bf16 autocast, atomic checkpoints, exact resume, DDP.

Batching. ``batch_size`` is the *global* number of examples per optimizer step. Each epoch's
order is a permutation fixed by ``(seed, epoch)`` (:func:`negtrace.finetune.data.epoch_order`);
step t of an epoch takes ``order[t*B:(t+1)*B]`` (a trailing partial batch is dropped), splits it
into ``accum`` micro-batches and each micro-batch into ``world_size`` contiguous rank slices.

Data parallel. Under ``torchrun`` (``WORLD_SIZE > 1``) each rank encodes its slice; embeddings
are all-gathered (the own slice keeps its graph, the others are detached), so every rank
computes the loss of the whole micro-batch, exactly as one process would; after backward the
gradients are summed over ranks (``all_reduce``), which gives the single-process gradient. The
towers are called through the adapters rather than ``forward()``, so this explicit all-reduce
replaces ``DistributedDataParallel``'s hooks. Backend: NCCL on CUDA, gloo on CPU.

Checkpoints (every ``checkpoint_every`` steps and at the end) are folders
``checkpoints/ckpt-{step:08d}`` written as a temporary folder then ``os.replace``-d into place;
``checkpoints/latest`` (a one-line file, also replaced atomically) names the newest. Each holds
the trainable tensors (``trainable.safetensors``), optimizer and scheduler state, every rank's
RNG states (torch, CUDA, numpy, python), the step, epoch and position in the epoch, the
epoch's example order, and a fingerprint of model, data and configuration; resuming refuses a
checkpoint whose fingerprint differs and says which fields differ.

Outputs in ``out_dir``: ``metrics.jsonl`` (one JSON line per logged step), ``eval_before.json``,
``eval_after.json``, ``run.json`` (configuration, scales, fingerprint) and the weights:
``model.safetensors`` (the full ``state_dict`` of the wrapped model) for methods ``lr`` / ``grad``,
or ``adapter.safetensors`` + ``adapter.json`` for ``lora``. Load them with
:func:`load_finetuned` onto a freshly loaded base model::

    model = negtrace.load(spec)                       # the same base model
    negtrace.finetune.loop.load_finetuned(model, "runs/ft")   # full weights, or LoRA merged in
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..models.hooked import HookedVLM
from .data import Example, ImageStore, epoch_order, load_examples
from .losses import clip_loss, combined_loss, mcq_loss
from .selective import Setup, make_scheduler, merge_lora, setup_training

__all__ = ["TrainConfig", "FinetuneResult", "train", "selective_finetune", "evaluate_model", "load_finetuned",
           "CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """A checkpoint from another model, data set or configuration."""


@dataclass
class TrainConfig:
    """Everything that decides the result of a run (and so enters the resume fingerprint)."""

    lr: float = 1e-5
    steps: int | None = None  # optimizer steps; default: one epoch
    epochs: float | None = None
    batch_size: int = 32  # global examples per optimizer step
    accum: int = 1
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    seed: int = 0
    w_clip: float = 1.0
    w_mcq: float = 1.0
    method: str = "lr"
    optimizer: str = "adamw"
    unscaled: Any = "frozen"
    towers: tuple[str, ...] = ("text",)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_scale_rank: bool = False
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, off on CPU; "bf16"; "off"
    train_mode: bool = True  # model.train() (dropout on) during steps
    # not part of the fingerprint:
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True

    RESULT_FIELDS = ("lr", "batch_size", "accum", "grad_clip", "weight_decay", "warmup_steps", "schedule", "seed",
                     "w_clip", "w_mcq", "method", "optimizer", "unscaled", "towers", "lora_r", "lora_alpha",
                     "lora_scale_rank", "amp", "train_mode")

    def check(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr!r}")
        for name in ("batch_size", "accum"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")


@dataclass
class FinetuneResult:
    model: HookedVLM
    out_dir: Path | None
    before: dict
    after: dict
    history: list[dict] = field(default_factory=list)
    steps: int = 0


# -- distributed -------------------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: Tensor, world: int, rank: int) -> Tensor:
    """Concatenate every rank's rows (sizes may differ); the own rows keep their graph."""
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded = torch.cat([x.detach(), pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def _all_reduce_grads(params: list[Tensor], world: int) -> None:
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# -- one micro-batch -------------------------------------------------------------------------

def _loss(model: HookedVLM, examples: Sequence[Example], images: ImageStore, cfg: TrainConfig, world: int,
          rank: int, autocast, k: int) -> tuple[Tensor, dict[str, float]]:
    device = model.device
    pix = images([e.image for e in examples]).to(device)
    captioned = [i for i, e in enumerate(examples) if e.caption is not None]
    mcq = [i for i, e in enumerate(examples) if e.options]
    texts = [examples[i].caption for i in captioned]
    negs = [n for i in captioned for n in examples[i].negatives]
    opts = [o for i in mcq for o in examples[i].options]
    with autocast():
        img = torch.nn.functional.normalize(model.encode_image(pix).float(), dim=-1)
        all_texts = texts + negs + opts
        if all_texts:
            # reports can outrun the context: cut them as open_clip's tokenizer does (EOT kept)
            txt = torch.nn.functional.normalize(model.encode_text(model.tokenize(all_texts, truncate=True)).float(),
                                                dim=-1)
        else:
            txt = img.new_zeros((0, img.shape[1]))
    t_cap, t_neg, t_opt = txt.split([len(texts), len(negs), len(opts)])
    scale = model.logit_scale.float()
    g = lambda x: _gather(x, world, rank)  # noqa: E731
    clip = mq = None
    cap_img = g(img[captioned])
    if cap_img.shape[0] > 0 and cfg.w_clip:
        clip = clip_loss(cap_img, g(t_cap), scale, negatives=g(t_neg))
    answers = torch.tensor([examples[i].answer for i in mcq], dtype=torch.long, device=device)
    mcq_img = g(img[mcq])
    if mcq_img.shape[0] > 0 and cfg.w_mcq:
        options = g(t_opt.reshape(len(mcq), k, img.shape[1]))
        mq = mcq_loss(mcq_img, options, g(answers), scale)
    return combined_loss(clip, mq, cfg.w_clip, cfg.w_mcq)


# -- evaluation ------------------------------------------------------------------------------

def retrieval_recall(model: HookedVLM, examples: Sequence[Example], images: ImageStore,
                     ks: Sequence[int] = (1, 5), batch_size: int = 64) -> dict[str, float]:
    """Image->caption and caption->image recall@k over ``examples`` (general-alignment check;
    :func:`negtrace.alignment.retrieval_recall` on the encoded examples)."""
    ex = [e for e in examples if e.caption is not None]
    if not ex:
        raise ValueError("retrieval needs examples with captions")
    img, txt = [], []
    with torch.no_grad():
        for i in range(0, len(ex), batch_size):
            chunk = ex[i:i + batch_size]
            img.append(torch.nn.functional.normalize(model.encode_image(images([e.image for e in chunk])
                                                                         .to(model.device)).float(), dim=-1).cpu())
            txt.append(torch.nn.functional.normalize(model.encode_text(model.tokenize([e.caption for e in chunk],
                                                                                       truncate=True)).float(),
                                                     dim=-1).cpu())
    from ..alignment import retrieval_recall as recall

    return {"n": len(ex), **recall(torch.cat(img), torch.cat(txt), ks)}


def evaluate_model(model: HookedVLM, *, polarity: Sequence | None = None, polarity_images: str | None = None,
                   retrieval: Sequence[Example] | None = None, images: ImageStore | None = None,
                   n_boot: int = 200, seed: int = 0) -> dict:
    """Polarity MCQ (negated / affirmative accuracy, gap; via :mod:`negtrace.evaluate`) and retrieval recall."""
    from ..evaluate import evaluate_polarity

    out: dict[str, Any] = {}
    was = model.model.training
    model.model.eval()
    try:
        if polarity:
            res = evaluate_polarity(model, list(polarity), image_root=polarity_images, n_boot=n_boot, seed=seed,
                                    progress=False)
            out["polarity"] = {k: res[k] for k in ("accuracy_negated", "accuracy_affirmative", "gap", "n_items")}
        if retrieval:
            out["retrieval"] = retrieval_recall(model, retrieval, images or ImageStore(model.preprocess))
    finally:
        model.model.train(was)
    return out


# -- checkpoints ------------------------------------------------------------------------------

def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _trainable(model: HookedVLM) -> dict[str, Tensor]:
    return {n: p for n, p in model.model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: HookedVLM, setup: Setup, scheduler, position: dict, fingerprint: dict,
                    rng: list[dict], keep: int = 2) -> Path:
    """Write ``folder/ckpt-{step}`` atomically (temporary folder + ``os.replace``) and point ``latest`` at it."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"ckpt-{position['step']:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        _atomic_safetensors(tmp / "trainable.safetensors", _trainable(model))
        torch.save({"optimizer": setup.optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                    "position": position}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"position": {k: v for k, v in position.items() if k != "order"},
                                                   "fingerprint": fingerprint}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _atomic_text(folder / "latest", final.name + "\n")
    old = sorted(p for p in folder.glob("ckpt-*") if p.is_dir() and p != final)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return path if path.is_dir() else None


def _fingerprint(model: HookedVLM, examples: Sequence[Example], cfg: TrainConfig, scales: dict, world: int) -> dict:
    h = hashlib.sha256()
    total = 0.0
    for n, p in model.model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
        total += float(p.detach().double().sum())
    d = hashlib.sha256()
    for e in examples:
        d.update(json.dumps([e.key, e.image if isinstance(e.image, str) else "tensor", e.caption, list(e.negatives),
                             list(e.options), e.answer]).encode())
    return {"model": model.name_, "parameters": h.hexdigest()[:16], "weights_sum": f"{total:.6e}",
            "data": d.hexdigest()[:16], "n_examples": len(examples), "world_size": world,
            "scales": {k: round(v, 8) for k, v in sorted(scales.items())},
            "config": {k: _plain(getattr(cfg, k)) for k in TrainConfig.RESULT_FIELDS}}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    if diffs:
        raise CheckpointMismatchError(f"refusing to resume from {where}: it belongs to a different model, data set or "
                                      "configuration (" + "; ".join(diffs[:6]) + "). Resume with the settings of "
                                      "that run, or start a fresh run in another out_dir")


# -- the loop ------------------------------------------------------------------------------------

def _autocast(model: HookedVLM, amp: str):
    cuda = model.device.type == "cuda"
    if amp == "bf16" and not cuda:
        raise ValueError("amp='bf16' needs a CUDA device (bf16 autocast is used on CUDA only); use amp='auto' or 'off'")
    enabled = cuda and amp in ("auto", "bf16")
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if cuda else _null()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(model: HookedVLM, scales, examples: Sequence[Example], cfg: TrainConfig, *,
          out_dir: str | os.PathLike | None = None, resume: bool = True,
          callbacks: Sequence[Callable[[str, dict], None]] = (),
          eval_fn: Callable[[HookedVLM], dict] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` in place. See the module docstring for batching, DDP and checkpoints.

    ``callbacks`` are called as ``cb(event, info)`` with events ``"step"`` and ``"checkpoint"``
    (an extension point for tests and custom logging). ``eval_fn(model) -> dict`` runs before
    and after training (rank 0 writes the results).
    """
    cfg.check()
    examples = list(examples)
    if not examples:
        raise ValueError("the training set is empty: no examples to fine-tune on")
    rank, world = _dist_info()
    micro = cfg.batch_size // (cfg.accum * world)
    if micro * cfg.accum * world != cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by accum ({cfg.accum}) x world size ({world})")
    batches_per_epoch = len(examples) // cfg.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the training set has {len(examples)} examples, fewer than one batch of {cfg.batch_size}; "
                         "lower batch_size or add data")
    n_options = {len(e.options) for e in examples if e.options}
    if len(n_options) > 1:
        raise ValueError(f"every MCQ example of a run must have the same number of options; got {sorted(n_options)}")
    n_opt = n_options.pop() if n_options else 0
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * batches_per_epoch))
    out = Path(out_dir) if out_dir is not None else None
    base_fp_model = _fingerprint(model, examples, cfg, {}, world)  # before adapters change the parameter set
    _seed_all(cfg.seed)
    setup = setup_training(model, scales, cfg.lr, method=cfg.method, optimizer=cfg.optimizer, unscaled=cfg.unscaled,
                           weight_decay=cfg.weight_decay, towers=tuple(cfg.towers), lora_r=cfg.lora_r,
                           lora_alpha=cfg.lora_alpha, lora_scale_rank=cfg.lora_scale_rank)
    fingerprint = {**base_fp_model, "total_steps": total,
                   "scales": {g: round(v, 8) for g, v in sorted(setup.scales.items())}}
    scheduler = make_scheduler(setup.optimizer, total, cfg.warmup_steps, cfg.schedule)
    params = [p for g in setup.groups for p in g["params"]]
    store = ImageStore(model.preprocess)
    autocast = _autocast(model, cfg.amp)
    is_main = rank == 0
    before = eval_fn(model) if eval_fn else {}
    step, epoch, batch_pos = 0, 0, 0
    ckpt_dir = out / "checkpoints" if out else None
    if out and is_main:
        out.mkdir(parents=True, exist_ok=True)
    if ckpt_dir and resume and (found := latest_checkpoint(ckpt_dir)) is not None:
        meta = json.loads((found / "meta.json").read_text())
        _check_fingerprint(meta["fingerprint"], json.loads(json.dumps(fingerprint)), found)
        from safetensors.torch import load_file

        saved = load_file(str(found / "trainable.safetensors"))
        named = dict(model.model.named_parameters())
        with torch.no_grad():
            for n, t in saved.items():
                named[n].copy_(t)
        state = torch.load(found / "state.pt", weights_only=True)
        setup.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank])
        pos = state["position"]
        step, epoch, batch_pos = pos["step"], pos["epoch"], pos["batch"]
        if pos["order"] != epoch_order(len(examples), cfg.seed, epoch):
            raise CheckpointMismatchError(f"{found}: the saved example order differs from the recomputed one")
        before = json.loads((out / "eval_before.json").read_text()) if (out / "eval_before.json").exists() else before
        metrics = out / "metrics.jsonl"
        if is_main and metrics.exists():  # drop steps logged after the checkpoint: they are about to be redone
            kept = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            _atomic_text(metrics, "".join(ln + "\n" for ln in kept))
    elif out and is_main:
        _atomic_text(out / "eval_before.json", json.dumps(before, indent=2))
    if out and is_main:
        _atomic_text(out / "run.json", json.dumps({"fingerprint": fingerprint, "total_steps": total,
                                                   "lora": asdict(setup.lora) if setup.lora else None}, indent=2))
    history: list[dict] = []
    log_path = out / "metrics.jsonl" if out else None
    if cfg.train_mode:
        model.model.train()
    bar = tqdm(total=total, initial=step, desc=f"finetune ({cfg.method})", disable=not (cfg.progress and is_main))
    while step < total:
        order = epoch_order(len(examples), cfg.seed, epoch)
        while batch_pos < batches_per_epoch and step < total:
            t0 = time.perf_counter()
            idx = order[batch_pos * cfg.batch_size:(batch_pos + 1) * cfg.batch_size]
            parts: list[dict] = []
            for m in range(cfg.accum):
                mb = idx[m * micro * world:(m + 1) * micro * world]
                local = [examples[i] for i in mb[rank * micro:(rank + 1) * micro]]
                loss, info = _loss(model, local, store, cfg, world, rank, autocast, n_opt)
                (loss / cfg.accum).backward()
                parts.append(info)
            _all_reduce_grads(params, world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip else None
            setup.optimizer.step()
            scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
            step, batch_pos = step + 1, batch_pos + 1
            record = {"step": step, "epoch": epoch, **{k: float(np.mean([p[k] for p in parts if k in p]))
                                                       for k in parts[0]},
                      "lr": setup.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            if log_path and is_main and (step % cfg.log_every == 0 or step == total):
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            for cb in callbacks:
                cb("step", record)
            if ckpt_dir and (step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                nxt_epoch, nxt_pos = (epoch, batch_pos) if batch_pos < batches_per_epoch else (epoch + 1, 0)
                position = {"step": step, "epoch": nxt_epoch, "batch": nxt_pos,
                            "order": epoch_order(len(examples), cfg.seed, nxt_epoch)}
                rngs = _gather_objects(_rng_state(), world)
                if is_main:
                    path = save_checkpoint(ckpt_dir, model, setup, scheduler, position, fingerprint, rngs,
                                           cfg.keep_checkpoints)
                    for cb in callbacks:
                        cb("checkpoint", {"step": step, "path": str(path)})
                if world > 1:
                    dist.barrier()
        if batch_pos >= batches_per_epoch:
            epoch, batch_pos = epoch + 1, 0
    bar.close()
    model.model.eval()
    for h in setup.handles:
        h.remove()
    after = eval_fn(model) if eval_fn else {}
    if out and is_main:
        _atomic_text(out / "eval_after.json", json.dumps(after, indent=2))
        save_weights(model, out, setup)
    return FinetuneResult(model, out, before, after, history, step)


def _gather_objects(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_weights(model: HookedVLM, out: Path, setup: Setup) -> Path:
    """``model.safetensors`` (full state dict) or, for LoRA, ``adapter.safetensors`` + ``adapter.json``."""
    if setup.lora is not None:
        lora = {n: p for n, p in model.model.named_parameters() if "lora_" in n}
        _atomic_safetensors(out / "adapter.safetensors", lora)
        _atomic_text(out / "adapter.json", json.dumps({"format": "negtrace-lora", **asdict(setup.lora)}, indent=2))
        return out / "adapter.safetensors"
    _atomic_safetensors(out / "model.safetensors", dict(model.model.state_dict()))
    return out / "model.safetensors"


def load_finetuned(model: HookedVLM, out_dir: str | os.PathLike, merge: bool = True) -> HookedVLM:
    """Apply a run's result to a freshly loaded *base* model (in place) and return it.

    Full weights (``model.safetensors``) are loaded with ``strict=True``; LoRA adapters are
    re-injected with the saved per-layer alphas, loaded, and (``merge=True``) folded into the
    base weights so hooks see the fine-tuned activations.
    """
    from safetensors.torch import load_file

    from .selective import inject_lora

    out = Path(out_dir)
    if (out / "model.safetensors").is_file():
        state = load_file(str(out / "model.safetensors"), device=str(model.device))
        model.model.load_state_dict(state, strict=True)
        return model
    if (out / "adapter.json").is_file():
        spec = json.loads((out / "adapter.json").read_text())
        name_of = {}
        for tower in ("text", "vision"):
            blocks = model.adapters[tower].blocks()
            for n, m in model.model.named_modules():
                for layer, blk in enumerate(blocks):
                    if m is blk:
                        name_of[n] = f"{tower}.blocks.{layer}"
        scales = {}
        for target, s in spec["targets"].items():
            owner = max((n for n in name_of if target.startswith(n + ".")), key=len, default=None)
            if owner is None:
                raise ValueError(f"{out}: adapter target {target} is not inside a block of this model")
            scales[name_of[owner]] = s
        inject_lora(model, scales, spec["r"], spec["alpha"], spec["dropout"], spec["scale_rank"])
        state = load_file(str(out / "adapter.safetensors"), device=str(model.device))
        named = dict(model.model.named_parameters())
        missing = sorted(set(state) - set(named))
        if missing:
            raise ValueError(f"{out}: adapter tensors {missing[:3]} do not fit this model; load the same base model")
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)
        return merge_lora(model) if merge else model
    raise FileNotFoundError(f"{out} holds no fine-tuning result (model.safetensors or adapter.json)")


def selective_finetune(model: HookedVLM, scales, train_data: Sequence[Example] | str | os.PathLike, *,
                       method: str = "lr", optimizer: str = "adamw", control: str | None = None,
                       out_dir: str | os.PathLike | None = None, eval_polarity: Sequence | None = None,
                       eval_images: str | None = None, eval_retrieval: Sequence[Example] | None = None,
                       resume: bool = True, callbacks: Sequence[Callable] = (), **config) -> FinetuneResult:
    """Fine-tune ``model`` with per-layer scales (NAST); the public entry point.

    ``scales``: a :class:`LayerScales` / dict (group -> scale), or ``"uniform"`` (every block of
    ``towers`` at 1), ``"full"`` (every parameter at 1: full fine-tuning) or ``"frozen"`` (no
    training: evaluation only). ``control="uniform"`` / ``"shuffled"`` turns CTE scales into the
    matching control (shuffled with ``seed``). ``train_data``: examples or a path for
    :func:`negtrace.finetune.data.load_examples`. Other keyword arguments are
    :class:`TrainConfig` fields (``lr``, ``steps``, ``batch_size``, ``accum``, ``seed``, ...).
    """
    from .scales import LayerScales

    unknown = sorted(set(config) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown fine-tuning options {unknown}; see TrainConfig")
    cfg = TrainConfig(method=method, optimizer=optimizer, **config)
    cfg.check()
    if control is not None:
        if isinstance(scales, str):
            raise ValueError(f"control={control!r} needs CTE scales to transform, got scales={scales!r}")
        base = scales if isinstance(scales, LayerScales) else LayerScales(dict(scales))
        if control == "uniform":
            scales = base.uniform()
        elif control == "shuffled":
            scales = base.shuffled(cfg.seed)
        else:
            raise ValueError(f"unknown control {control!r}; use 'uniform' or 'shuffled'")
    if not isinstance(train_data, (list, tuple)):
        train_data = load_examples(train_data)
    eval_fn = None
    if eval_polarity or eval_retrieval:
        def eval_fn(m):
            return evaluate_model(m, polarity=eval_polarity, polarity_images=eval_images, retrieval=eval_retrieval,
                                  seed=cfg.seed)
    if isinstance(scales, str) and scales == "frozen":
        result = eval_fn(model) if eval_fn else {}
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            _atomic_text(Path(out_dir) / "eval_before.json", json.dumps(result, indent=2))
            _atomic_text(Path(out_dir) / "eval_after.json", json.dumps(result, indent=2))
        return FinetuneResult(model, Path(out_dir) if out_dir else None, result, result, [], 0)
    return train(model, scales, train_data, cfg, out_dir=out_dir, resume=resume, callbacks=callbacks, eval_fn=eval_fn)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `negtrace finetune`")
