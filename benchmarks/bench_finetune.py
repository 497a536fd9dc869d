"""Step-time overhead of selective fine-tuning (method="lr") vs plain uniform AdamW.

Both optimise the same parameters of two identical copies of one model on the same batches;
the only difference is the optimizer: one AdamW group per layer with lr x s_l (NAST) vs one
AdamW group at a single lr. Steps alternate between the two (side by side, so machine load
hits both alike); the median step times and their ratio are printed (target: within 5%).

    python benchmarks/bench_finetune.py                 # tiny open_clip, CPU
    python benchmarks/bench_finetune.py --size base     # ViT-B-32 shapes (use a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from negtrace.finetune.data import Example, ImageStore
from negtrace.finetune.loop import TrainConfig, _autocast, _loss
from negtrace.finetune.selective import make_optimizer, make_scheduler, setup_training


def _model(size: str, seed: int, device: str):
    from negtrace.models.random_models import tiny_open_clip, vit_b32

    m = tiny_open_clip(seed) if size == "tiny" else vit_b32(seed)
    m.model.to(device)
    return m


def _batches(model, n_batches: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = model.image_size
    return [[Example(torch.randn(3, h, w, generator=g), f"there is no pleural effusion {i}",
                     (f"there is a pleural effusion {i}",)) for i in range(batch)] for _ in range(n_batches)]


def _step(model, setup_opt, sched, params, batch, store, cfg, autocast, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, _ = _loss(model, batch, store, cfg, 1, 0, autocast, 0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    setup_opt.step()
    sched.step()
    setup_opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "base"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    nast, plain = _model(args.size, 0, args.device), _model(args.size, 0, args.device)
    n = nast.n_layers("text")
    scales = {f"text.blocks.{layer}": 0.1 + 0.9 * layer / max(1, n - 1) for layer in range(n)}  # a NAST-like ramp
    cfg = TrainConfig(lr=1e-4)
    s_nast = setup_training(nast, scales, cfg.lr, method="lr")
    s_plain = setup_training(plain, scales, cfg.lr, method="lr")  # same trainable set ...
    params_plain = [q for g in s_plain.groups for q in g["params"]]
    opt_plain = make_optimizer([{"params": params_plain, "lr": cfg.lr}], "adamw")  # ... one uniform group
    runs = {"lr (per-layer groups)": (nast, s_nast.optimizer, [q for g in s_nast.groups for q in g["params"]]),
            "plain AdamW (one group)": (plain, opt_plain, params_plain)}
    scheds = {k: make_scheduler(o, args.steps + args.warmup) for k, (_, o, _) in runs.items()}
    stores = {k: ImageStore(m.preprocess) for k, (m, _, _) in runs.items()}
    batches = _batches(nast, args.steps + args.warmup, args.batch)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i, batch in enumerate(batches):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for k in order:
            m, opt, params = runs[k]
            m.model.train()
            dt = _step(m, opt, scheds[k], params, batch, stores[k], cfg, _autocast(m, "auto"), args.device)
            if i >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {nast!r}; device {args.device}; batch {args.batch}; {args.steps} timed steps each, "
          f"{len(s_nast.groups)} lr groups")
    for k, v in med.items():
        print(f"  {k:<26} median step {1000 * v:8.2f} ms")
    a, b = times["lr (per-layer groups)"], times["plain AdamW (one group)"]
    ratio = med["lr (per-layer groups)"] / med["plain AdamW (one group)"]
    paired = statistics.median(x / y for x, y in zip(a, b, strict=True))  # same batch, adjacent in time
    print(f"step-time ratio lr / plain: of medians {ratio:.3f}; median of paired ratios {paired:.3f}; "
          f"of minima {min(a) / min(b):.3f}  ({'within' if abs(paired - 1) <= 0.05 else 'OUTSIDE'} 5%, paired)")


if __name__ == "__main__":
    main()
