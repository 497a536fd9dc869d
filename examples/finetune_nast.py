"""Trace negation, turn the map into per-layer learning rates, fine-tune (NAST), evaluate before/after.

The whole NAST recipe (Abbasi et al. 2026; DESIGN §6) on one model, in one script:

1. trace: causal tracing of negation in the text tower (negated statements vs their
   affirmative counterparts, against a normal phantom radiograph; ``examples/_common.py``),
   written to ``--out`` as ``heatmap.html``, ``cte.safetensors`` + ``cte.json``, ``summary.json``;
2. scales: ``negtrace.layer_scales(agg, policy, stat, site, floor)`` turns the aggregate map of
   one site into one scale per text block (``scales.json``, ``scales.html``);
3. fine-tune: ``negtrace.selective_finetune`` with those scales (``--method lr``: per-layer
   learning rates under AdamW; ``--method lora``: per-layer LoRA alpha), and with the controls
   of ``--controls`` (uniform scales; the same scales shuffled across layers) at the same budget,
   each from the same starting weights, on a phantom dataset (built when missing) or on your
   image-caption pairs (``--train``);
4. evaluate: the polarity MCQ (accuracy on negated and on affirmative wording, and their gap)
   before and after each run; ``results.json``, ``results.md`` and one folder per run under
   ``finetune/`` (``metrics.jsonl``, ``eval_before.json``, ``eval_after.json``, ``run.json`` and
   the weights; reload them with ``negtrace.load_finetuned(negtrace.load(SPEC), FOLDER)``).

Setup (from the repository root):

    python3 -m venv .venv && . .venv/bin/activate && pip install -e .

The embedded phantom model (no download; a phantom dataset is rendered into ``--data``):

    python examples/finetune_nast.py --model phantom --out runs/finetune-phantom

CheXzero (weights from the authors' release, see ``examples/trace_chexzero.py``), BiomedCLIP
(Hugging Face Hub, or ``--model local-dir:/models/biomedclip``), PubMedCLIP (``--model pubmedclip``):

    python examples/finetune_nast.py --model chexzero --weights /models/best_64_5e-05_original_22000_0.864.pt \\
        --out runs/finetune-chexzero --steps 300 --batch-size 32 --lr 1e-5

Your own training pairs (CSV or JSONL with columns ``image``, ``caption`` and optionally
``negated_caption``; image paths relative to the file or ``--image-root``) and your own
polarity benchmark (``negtrace build polarity --labels chexpert/train.csv --out polarity.jsonl``,
images under ``--eval-images``):

    python examples/finetune_nast.py --model biomedclip --train pairs.csv --eval-polarity polarity.jsonl \\
        --eval-images /data/chexpert --out runs/finetune-biomedclip

Without any weights (CI, a first look at the pipeline): ``--offline-random`` builds a tiny
random-initialised model of a real architecture (``--arch chexzero``, ``biomedclip`` or
``pubmedclip``), a tiny phantom data set and a few steps; it runs in seconds on a CPU and its
numbers mean nothing:

    python examples/finetune_nast.py --offline-random --out runs/finetune-random

The phantom evaluation uses *complete* labels: the phantom world knows every finding, so each
finding a study does not have is a certain absence (as in ``benchmarks/nast_phantom.py``). A few
hundred steps on a notebook-sized data set are a demonstration, not evidence; the controlled,
multi-seed comparison is ``benchmarks/nast_phantom.py``.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import _common

CONDITIONS = ("nast", "uniform", "shuffled")
KEYS = (("accuracy_negated", "negated"), ("accuracy_affirmative", "affirmative"), ("gap", "gap"))


def build_parser():
    p = _common.parser(__doc__.split("\n")[0],
                       "weights for --model: an open_clip checkpoint file (CheXzero's .pt) passed as pretrained=")
    p.add_argument("--model", default="phantom",
                   help="negtrace.load spec: phantom, chexzero (with --weights), biomedclip, pubmedclip, "
                        "local-dir:FOLDER, hf:FOLDER, or an open_clip model name")
    p.add_argument("--arch", choices=["chexzero", "biomedclip", "pubmedclip"], default="chexzero",
                   help="with --offline-random: which architecture to build with random weights")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="phantom dataset folder (built when missing; default: OUT/phantom-data)")
    data.add_argument("--n-train", type=int, default=None, help="phantom training images (default 2000; tiny: 32)")
    data.add_argument("--n-test", type=int, default=None, help="phantom test images (default 500; tiny: 24)")
    data.add_argument("--render-size", type=int, default=None, help="phantom size in px (default: the model's)")
    data.add_argument("--train", default=None, help="training pairs CSV/JSONL (image, caption[, negated_caption]) "
                                                    "instead of the phantom training split")
    data.add_argument("--image-root", default=None, help="folder the --train image paths are relative to")
    data.add_argument("--eval-polarity", default=None,
                      help="polarity MCQ JSONL (negtrace build polarity) instead of the phantom test split")
    data.add_argument("--eval-images", default=None, help="image folder of --eval-polarity")
    data.add_argument("--n-items", type=int, default=None, help="at most this many polarity items")
    ft = p.add_argument_group("scales and fine-tuning")
    ft.add_argument("--site", choices=["resid", "attn", "mlp"], default="attn", help="CTE site the scales come from")
    ft.add_argument("--policy", choices=["max", "sum", "softmax", "rank"], default="max")
    ft.add_argument("--stat", choices=["mean", "cue", "pooled", "sum", "std", "max"], default="mean")
    ft.add_argument("--floor", type=float, default=0.05, help="smallest scale (keeps every block trainable)")
    ft.add_argument("--method", choices=["lr", "lora"], default="lr",
                    help="lr: per-layer learning rates (AdamW); lora: per-layer LoRA alpha")
    ft.add_argument("--controls", nargs="*", choices=["uniform", "shuffled"], default=["uniform", "shuffled"],
                    help="control runs at the same budget (none: NAST only)")
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; tiny: 2)")
    ft.add_argument("--batch-size", type=int, default=None, help="examples per step (default 32; tiny: 8)")
    ft.add_argument("--lr", type=float, default=None, help="base learning rate (default 1e-5; tiny: 1e-3)")
    ft.add_argument("--lora-r", type=int, default=8)
    ft.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default 1000; tiny: 100)")
    return p


def defaults(args) -> None:
    """Sizes: small for --offline-random (seconds), research-sized otherwise; explicit options win."""
    tiny = args.offline_random
    for key, (small, full) in {"n_train": (32, 2000), "n_test": (24, 500), "steps": (2, 300),
                               "batch_size": (8, 32), "lr": (1e-3, 1e-5), "n_boot": (100, 1000)}.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    _common.default_out(args, "finetune-random" if tiny else "finetune-nast")
    if args.data is None:
        args.data = str(Path(args.out) / "phantom-data")


def load_model(args, scratch: str):
    """The model to fine-tune, in fp32 (shipped fp16 weights train badly), and a label for it."""
    import negtrace as nt

    if args.offline_random:
        if args.arch == "chexzero":
            from trace_chexzero import random_chexzero

            model = random_chexzero(args.size, args.seed)
        elif args.arch == "biomedclip":
            from negtrace.models.random_models import write_biomedclip_folder

            model = nt.load(write_biomedclip_folder(scratch, seed=args.seed, size=args.size), device="cpu")
        else:
            from negtrace.models.random_models import hf_clip

            model = hf_clip(scratch, seed=args.seed, size=args.size)
        label = f"{args.arch} architecture ({args.size}, random init)"
    else:
        model = nt.load(args.model, pretrained=args.weights, device=args.device)
        label = args.model + (f" ({args.weights})" if args.weights else "")
    if args.device and args.offline_random:
        model.to(args.device)
    model.model.float()
    return model, label


def complete_labels(data: Path, split: str) -> Path:
    """A CheXpert CSV of ``split`` where every finding that is not present is a certain absence (0)."""
    from negtrace.data.findings import FINDINGS, NO_FINDING

    with open(data / f"labels_{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = data / f"labels_{split}_complete.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            r.update({c: ("1.0" if r[c] == "1.0" else "0.0") for c in FINDINGS})
            r[NO_FINDING] = "0.0" if any(r[c] == "1.0" for c in FINDINGS) else "1.0"
            w.writerow(r)
    return out


def datasets(args, model):
    """Training examples, polarity items and their image folder."""
    from negtrace.data.phantom import build_phantom_dataset
    from negtrace.finetune.data import load_examples

    data = Path(args.data)
    need_phantom = args.train is None or args.eval_polarity is None
    if need_phantom and not (data / "reports_test.jsonl").is_file():
        size = args.render_size or max(32, model.image_size[0])
        print(f"building a phantom dataset in {data} ({args.n_train} train / {args.n_test} test, {size} px)")
        build_phantom_dataset(data, args.n_train, 0, args.n_test, size=size, seed=args.seed, progress=False)
    train = load_examples(args.train, "pairs", image_root=args.image_root) if args.train else \
        load_examples(data, "phantom", "train")
    if args.eval_polarity:
        from negtrace.data.schema import PolarityItem, read_jsonl

        items, images = read_jsonl(args.eval_polarity, PolarityItem), args.eval_images
    else:
        from negtrace.data.labels import read_labels
        from negtrace.data.polarity import build_polarity

        items, images = build_polarity(read_labels(complete_labels(data, "test")), seed=args.seed).items, str(data)
    items = list(items)[:args.n_items] if args.n_items else list(items)
    if not items:
        raise SystemExit("no polarity items to evaluate on")
    return train, items, images


def _value(entry) -> float:
    return float(entry["value"]) if isinstance(entry, dict) else float(entry)


def polarity_numbers(evaluation: dict) -> dict[str, float]:
    pol = evaluation["polarity"]
    return {short: _value(pol[key]) for key, short in KEYS}


def table(before: dict, runs: dict) -> str:
    lines = ["| run | negated acc | affirmative acc | gap (aff - neg) |", "|---|---|---|---|",
             "| before | " + " | ".join(f"{before[k]:.3f}" for _, k in KEYS) + " |"]
    for name, r in runs.items():
        cells = [f"{r['after'][k]:.3f} ({r['after'][k] - before[k]:+.3f})" for _, k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.offline_random and args.model == "chexzero" and args.weights is None:
        p.error("--model chexzero needs --weights best_64_...pt (see examples/trace_chexzero.py), "
                "or use --offline-random")
    defaults(args)
    import negtrace as nt
    from negtrace.patching.result import CTEResult

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="negtrace-finetune-") as scratch:
        base, label = load_model(args, str(Path(scratch) / "base"))
        # 1. trace (writes heatmap.html, cte.*, summary.json)
        summary = _common.trace(base, args, model_label=label, random_weights=args.offline_random)
        agg = CTEResult.load(out / "cte")
        # 2. scales
        scales = nt.layer_scales(agg, policy=args.policy, stat=args.stat, site=args.site, floor=args.floor)
        scales.save(out / "scales.json")
        nt.save_figure(scales.figure(), out / "scales.html")
        print(scales)
        # 3-4. fine-tune and evaluate, every run from the same starting weights
        train, items, images = datasets(args, base)
        print(f"{len(train)} training examples, {len(items)} polarity items; {args.steps} steps x batch "
              f"{args.batch_size}, lr {args.lr}, method {args.method}")
        variants = {"nast": scales, "uniform": scales.uniform(), "shuffled": scales.shuffled(args.seed)}
        runs: dict[str, dict] = {}
        before = None
        for name in ("nast", *args.controls):
            # a freshly loaded model per run (copy.deepcopy of a HookedVLM breaks its hook names)
            model = base if name == "nast" else load_model(args, str(Path(scratch) / name))[0]
            started = time.perf_counter()
            res = nt.selective_finetune(model, variants[name], train, method=args.method, lr=args.lr,
                                        steps=args.steps, batch_size=min(args.batch_size, len(train)),
                                        seed=args.seed, lora_r=args.lora_r, eval_polarity=items,
                                        eval_images=images, out_dir=out / "finetune" / name, resume=False,
                                        progress=False)
            before = before or polarity_numbers(res.before)
            losses = [h["loss"] for h in res.history]
            runs[name] = {"after": polarity_numbers(res.after), "scales": dict(variants[name]),
                          "steps": res.steps, "loss_first": losses[0], "loss_last": losses[-1],
                          "seconds": round(time.perf_counter() - started, 2)}
            print(f"{name:>8}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {runs[name]['seconds']:.1f} s; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in runs[name]["after"].items()))
            del model
    md = table(before, runs)
    results = {"model": label, "random_weights": args.offline_random, "method": args.method,
               "scales_from": {"site": args.site, "policy": args.policy, "stat": args.stat, "floor": args.floor},
               "budget": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr},
               "n_train": len(train), "n_items": len(items), "before": before, "runs": runs,
               "trace": {k: summary[k] for k in ("n_pairs", "n_flagged", "strongest")}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(md + "\n")
    print("polarity MCQ before and after (change in brackets):")
    print(md)
    if args.offline_random:
        print("[random weights: the pipeline is real, the numbers are not]")
    print(f"wrote {out}/scales.json, scales.html, results.json, results.md, finetune/<run>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
