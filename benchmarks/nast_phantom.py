"""NAST on the phantom world: frozen baseline vs uniform vs shuffled vs CTE (NAST) scales.

Every fine-tuned condition gets the same budget (steps, batch, base learning rate, trainable
groups: the text tower's blocks) and the same seeds; only the per-layer scales differ:

    baseline  no training (frozen)
    uniform   every text block at scale 1
    shuffled  the NAST scales permuted across layers (seeded per run)
    nast      scales from causal tracing of the model itself (layer_scales of the aggregated CTE map)

Reported per condition (mean over seeds, 95% t-interval over seeds): polarity MCQ accuracy
on negated and on affirmative wording and their gap (NAST, Abbasi et al. 2026; MCQ after
NegBench, Alhamoud et al. 2025), and general-alignment retention = fine-tuned / baseline
image-report retrieval recall@5 and zero-shot finding AUC on the test split.

The polarity items come from the test split's *complete* labels: the phantom world knows
every finding, so each finding not present is absent (0), as ``negtrace build contextual
--attributes-complete`` assumes; the report-derived CheXpert labels mark only mentioned absences.

    python benchmarks/nast_phantom.py --data runs/phantom-data --out runs/nast       # embedded model
    python benchmarks/nast_phantom.py --tiny --out /tmp/nast-tiny                     # random tiny model, minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

CONDITIONS = ("baseline", "uniform", "shuffled", "nast")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _load_model(spec: str, seed: int = 0):
    import negtrace
    from negtrace.models.random_models import tiny_open_clip

    model = tiny_open_clip(seed) if spec == "tiny-random" else negtrace.load(spec)
    model.model.float()  # fp16 shipped weights: train and evaluate in fp32 (bf16 autocast on CUDA)
    return model


def _ensure_data(args) -> Path:
    from negtrace.data.phantom import build_phantom_dataset

    data = Path(args.data)
    if not (data / "reports_test.jsonl").is_file():
        print(f"building phantom dataset in {data} ({args.n_train}/{args.n_val}/{args.n_test}, {args.size} px)",
              file=sys.stderr)
        build_phantom_dataset(data, args.n_train, args.n_val, args.n_test, size=args.size, progress=not args.quiet)
    return data


def polarity_items(data: Path, split: str, n_items: int | None):
    from negtrace.data.labels import read_labels
    from negtrace.data.polarity import build_polarity
    from negtrace.models.phantom_train import complete_labels

    table = complete_labels(read_labels(data / f"labels_{split}.csv"))
    return build_polarity(table, seed=0, n_items=n_items).items


def evaluate(model, data: Path, items, n_boot: int) -> dict:
    from negtrace.evaluate import evaluate_polarity
    from negtrace.models.phantom_train import evaluate_phantom

    model.model.eval()
    with torch.no_grad():
        general = evaluate_phantom(model, data, "test", mcq=False)
        pol = evaluate_polarity(model, items, image_root=data, n_boot=n_boot, progress=False)
    auc = general["zero_shot_auc"]["mean"]
    r5 = general["retrieval"]["image_to_text_R@5"]
    return {"negated": pol["accuracy_negated"]["value"], "affirmative": pol["accuracy_affirmative"]["value"],
            "gap": pol["gap"]["value"], "recall@5": float(r5), "auc": float(auc),
            "n_items": pol["n_items"]}


def nast_scales(model, args):
    """Trace negation in the text tower (text-only cosine metric) and turn it into scales."""
    import negtrace
    from negtrace.data.polarity import FINDING_PHRASES
    from negtrace.finetune.scales import LayerScales

    if args.scales:
        return LayerScales.load(args.scales)
    sentences = [f"there is no {phrases[0]}." for phrases in FINDING_PHRASES.values()]
    results = negtrace.patch(model, clean=sentences, sites=(args.site,), progress=False)
    agg = negtrace.aggregate(results)
    return negtrace.layer_scales(agg, policy=args.policy, stat=args.stat, site=args.site, floor=args.floor)


def _ci(values: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    h = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - h, m + h


def table(runs: dict[str, list[dict]], base: dict) -> str:
    cols = [("negated", "negated acc"), ("affirmative", "affirmative acc"), ("gap", "gap (aff - neg)"),
            ("recall@5", "retrieval retention"), ("auc", "AUC retention")]
    lines = ["| condition | runs | " + " | ".join(c for _, c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for cond, rs in runs.items():
        cells = []
        for key, _ in cols:
            vals = [r[key] / base[key] if key in ("recall@5", "auc") and base[key] else r[key] for r in rs]
            m, lo, hi = _ci(vals)
            cells.append(f"{m:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else ""))
        lines.append(f"| {cond} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="phantom", help="negtrace.load spec, or tiny-random")
    p.add_argument("--tiny", action="store_true", help="end-to-end check: random tiny model, tiny data, few steps")
    p.add_argument("--data", default=None, help="phantom dataset folder (built when missing)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n-items", type=int, default=None, help="polarity items (default: every eligible test study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--method", default="lr", choices=["lr", "lora"])
    p.add_argument("--policy", default="max", choices=["max", "sum", "softmax", "rank"])
    p.add_argument("--stat", default="mean", choices=["mean", "cue", "pooled", "sum", "std", "max"])
    p.add_argument("--site", default="resid", choices=["resid", "attn", "mlp"], help="CTE site the scales come from")
    p.add_argument("--floor", type=float, default=0.05)
    p.add_argument("--scales", default=None, help="use these scales JSON instead of tracing")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default="runs/nast-phantom")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:  # small defaults; options given explicitly still win
        tiny = {"model": "tiny-random", "data": os.path.join(tempfile.gettempdir(), "negtrace-nast-tiny-data"),
                "n_train": 24, "n_val": 4, "n_test": 120, "size": 32, "steps": 3, "batch_size": 8, "lr": 1e-3,
                "n_boot": 100, "n_items": 24}
        for key, value in tiny.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.data is None:
        p.error("--data is required (a phantom dataset folder; it is built when missing)")
    from negtrace.finetune.data import load_examples
    from negtrace.finetune.loop import selective_finetune

    data = _ensure_data(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = polarity_items(data, "test", args.n_items)
    train = load_examples(data, "phantom", "train")
    probe = _load_model(args.model)
    scales = nast_scales(probe, args)
    scales.save(out / "nast_scales.json")
    print(scales, file=sys.stderr)
    base = evaluate(probe, data, items, args.n_boot)
    runs: dict[str, list[dict]] = {"baseline": [base]}
    for cond in CONDITIONS[1:]:
        runs[cond] = []
        for seed in args.seeds:
            model = _load_model(args.model)
            s = {"uniform": scales.uniform(), "shuffled": scales.shuffled(seed), "nast": scales}[cond]
            selective_finetune(model, s, train, method=args.method, lr=args.lr, steps=args.steps,
                               batch_size=args.batch_size, seed=seed, progress=not args.quiet)
            r = evaluate(model, data, items, args.n_boot)
            r.update(seed=seed, scales=dict(s))
            runs[cond].append(r)
            print(f"{cond} seed {seed}: {json.dumps({k: r[k] for k in ('negated', 'affirmative', 'gap', 'recall@5')})}",
                  file=sys.stderr)
    md = table(runs, base)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2, default=str))
    (out / "table.md").write_text(md + "\n")
    print(f"model {args.model}; {len(items)} polarity items; {args.steps} steps x batch {args.batch_size}, "
          f"lr {args.lr}, method {args.method}; seeds {args.seeds}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
