"""``negtrace finetune``: selective fine-tuning (NAST) from the command line.

Examples::

    negtrace finetune --model phantom --train data/phantom --scales runs/trace/scales.json --out runs/ft
    negtrace finetune --model phantom --train data/phantom --scales uniform --out runs/ft-uniform
    negtrace finetune --model phantom --train data/phantom --scales runs/trace/scales.json --control shuffled ...
    torchrun --nproc_per_node 2 -m negtrace.cli finetune ...      # data parallel (gloo on CPU)

``--scales`` is a JSON file written by ``LayerScales.save`` (or a CTE result prefix
``runs/trace/cte`` from ``negtrace trace``, turned into scales with ``--policy``), or one of
``uniform``, ``full``, ``frozen``. Resuming is automatic when ``--out`` holds a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["configure_finetune", "run_finetune"]


def configure_finetune(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``negtrace finetune``."""
    a = parser.add_argument
    a("--model", required=True, help="model spec for negtrace.load (e.g. phantom, local-dir:..., hf:...)")
    a("--train", required=True, type=Path, help="phantom dataset folder, polarity JSONL or CSV/JSONL of "
      "image,caption[,negated_caption]")
    a("--train-kind", default="auto", choices=["auto", "phantom", "polarity", "pairs"])
    a("--split", default="train", help="phantom split to train on")
    a("--images", type=Path, help="folder image paths are relative to (default: the data file's folder)")
    a("--scales", required=True, help="scales JSON, a CTE result prefix, or uniform | full | frozen")
    a("--policy", default="max", choices=["max", "sum", "softmax", "rank"], help="policy when --scales is a CTE result")
    a("--control", default=None, choices=["uniform", "shuffled"], help="turn CTE scales into a control")
    a("--method", default="lr", choices=["lr", "lora", "grad"])
    a("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    a("--towers", nargs="+", default=["text"], choices=["text", "vision"], help="towers for --scales uniform")
    a("--lr", type=float, default=1e-5)
    a("--steps", type=int, default=None)
    a("--epochs", type=float, default=None)
    a("--batch-size", type=int, default=32)
    a("--accum", type=int, default=1)
    a("--grad-clip", type=float, default=1.0)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0)
    a("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    a("--w-clip", type=float, default=1.0)
    a("--w-mcq", type=float, default=1.0)
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16.0)
    a("--amp", default="auto", choices=["auto", "bf16", "off"])
    a("--seed", type=int, default=0)
    a("--checkpoint-every", type=int, default=0)
    a("--eval-polarity", type=Path, help="polarity MCQ JSONL evaluated before and after")
    a("--eval-images", type=Path, help="image folder of --eval-polarity")
    a("--eval-retrieval", type=Path, help="data for the retrieval check (default: the phantom 'val' split)")
    a("--max-eval", type=int, default=500, help="at most this many retrieval examples")
    a("--out", required=True, type=Path)
    a("--no-resume", action="store_true", help="ignore checkpoints in --out")
    a("--device", default=None)
    a("--no-progress", action="store_true")


def _scales(args, model):
    from .scales import LayerScales, layer_scales

    if args.scales in ("uniform", "full", "frozen"):
        return args.scales
    path = Path(args.scales)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if "scales" in data:
            return LayerScales.load(path)
    if path.with_suffix(".safetensors").is_file():
        from ..patching.result import CTEResult

        return layer_scales(CTEResult.load(path), args.policy)
    raise FileNotFoundError(f"--scales {args.scales!r} is neither a scales JSON, a CTE result prefix, nor one of "
                            "uniform, full, frozen")


def run_finetune(args: argparse.Namespace) -> int:
    """Run ``negtrace finetune``; returns the exit code."""
    import negtrace

    from .data import load_examples
    from .loop import selective_finetune

    examples = load_examples(args.train, args.train_kind, args.split, args.images)
    retrieval = None
    if args.eval_retrieval:
        retrieval = load_examples(args.eval_retrieval)[:args.max_eval]
    elif args.train.is_dir() and (args.train / "reports_val.jsonl").is_file():
        retrieval = load_examples(args.train, "phantom", "val")[:args.max_eval]
    polarity = None
    if args.eval_polarity:
        from ..data.schema import PolarityItem, read_jsonl

        polarity = read_jsonl(args.eval_polarity, PolarityItem)
    model = negtrace.load(args.model, **({"device": args.device} if args.device else {}))
    result = selective_finetune(
        model, _scales(args, model), examples, method=args.method, optimizer=args.optimizer, control=args.control,
        out_dir=args.out, eval_polarity=polarity, eval_images=str(args.eval_images or args.eval_polarity.parent)
        if polarity else None, eval_retrieval=retrieval, resume=not args.no_resume, lr=args.lr, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, accum=args.accum, grad_clip=args.grad_clip or None,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule, seed=args.seed,
        w_clip=args.w_clip, w_mcq=args.w_mcq, towers=tuple(args.towers), lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, amp=args.amp, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "steps": result.steps, "before": result.before, "after": result.after}))
    return 0


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m negtrace.finetune.cli`
    parser = argparse.ArgumentParser(prog="negtrace finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_finetune(parser)
    return run_finetune(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
