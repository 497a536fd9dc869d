"""``negtrace`` command line: demo | trace | plot | build | eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_SENTENCES = [
    "there is no pleural effusion.",
    "there is no pneumothorax.",
    "there is no focal consolidation.",
    "there is no cardiomegaly.",
    "there is no pulmonary edema.",
    "there is no rib fracture.",
]


def _load_model(spec: str | None, device: str | None):
    import negtrace

    return negtrace.load("phantom" if spec in (None, "default") else spec, device=device)


def _print_summary(out: Path) -> None:
    summary = json.loads((out / "cte.json").read_text())
    print(f"examples: {summary['n_examples']}  flagged (tiny denominator): {summary['n_flagged']}")
    for site, values in summary["per_layer_mean"].items():
        best = max(range(len(values)), key=lambda i: values[i] if values[i] == values[i] else -1e9)
        print(f"{site:>5}: strongest layer {'emb' if best == 0 else best} (mean CTE {values[best]:.3f})")
    for cell in summary["top_cells"][:3]:
        print(f"  top cell: layer {cell['layer']}, {cell['role']}: CTE {cell['cte']:.3f}")


def _write_figures(out: Path, formats: list[str]) -> None:
    try:
        from negtrace.patching.result import CTEResult
        from negtrace.plot import heatmap, save_figure
    except ImportError:
        return
    agg = CTEResult.load(out / "cte")
    fig = heatmap(agg)
    for fmt in ["html", *formats]:
        save_figure(fig, out / f"heatmap.{fmt}")


def _rank_device(device: str | None) -> str | None:
    """Under torchrun, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    import os

    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _phantom_pairs(model, out: Path):
    """The main job's inputs: seeded phantoms and the negated statements true of them."""
    from negtrace.data.phantom_pairs import write_phantom_pairs
    from negtrace.trace_job import read_records

    folder = out / "phantom_pairs"
    path = write_phantom_pairs(folder, model.tokenizer, model.image_size[0], progress=False)
    return read_records(path), folder


def cmd_trace(args) -> int:
    """Trace (sharded over ranks when launched with torchrun; only rank 0 writes and prints)."""
    from negtrace.patching.distributed import launched_group

    with launched_group() as (rank, _world):
        return _trace(args, rank)


def _trace(args, rank: int) -> int:
    from negtrace.trace_job import TraceRecord, read_records, run_trace

    model = _load_model(args.model, _rank_device(args.device))
    out = Path(args.out)
    if args.input:
        records = read_records(args.input)
        base = Path(args.input).parent
    elif args.command == "demo":
        records, base = _phantom_pairs(model, out)
    else:
        records, base = [TraceRecord(s) for s in DEMO_SENTENCES], Path(".")
    config = {"model": args.model or "default", "input": str(args.input), "corrupt": args.corrupt,
              "sites": list(args.sites), "metric": args.metric, "window": args.window, "samples": args.samples,
              **({"seed": args.seed} if args.corrupt == "noise" else {})}
    agg = run_trace(model, records, out, config, base, corrupt=args.corrupt, sites=args.sites, metric=args.metric,
                    window=args.window, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                    progress=not args.no_progress)
    if agg is None:
        return 1
    if rank != 0:
        return 0
    _write_figures(out, args.formats)
    _print_summary(out)
    print(f"results in {out}/ (cte.safetensors, cte.json, heatmap.html)")
    return 0


def cmd_plot(args) -> int:
    out = Path(args.results)
    if not (out / "cte.json").exists():
        print(f"error: {out} holds no results (cte.json missing); run `negtrace trace` first", file=sys.stderr)
        return 2
    _write_figures(out, args.formats)
    print(f"figures written to {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="negtrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, helptext in (("trace", "causal tracing of negation over a file of statements"),
                           ("demo", "the main job on the embedded default model and its tracing pairs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=None, help="model spec for negtrace.load (default: embedded model)")
        p.add_argument("--input", default=None, help="JSONL tracing pairs or CSV (text, foil, image)")
        p.add_argument("--out", default="runs/trace" if name == "trace" else "runs/demo")
        p.add_argument("--corrupt", default="pair", choices=["pair", "substitute", "noise"])
        p.add_argument("--sites", nargs="+", default=["resid", "attn", "mlp"], choices=["resid", "attn", "mlp"])
        p.add_argument("--metric", default=None, choices=["logit", "margin", "option_prob", "cosine"])
        p.add_argument("--window", type=int, default=1)
        p.add_argument("--samples", type=int, default=10)
        p.add_argument("--seed", type=int, default=0, help="noise seed (record i uses seed + i)")
        p.add_argument("--batch-size", type=int, default=1,
                       help="records traced together in one sweep (faster; >1 changes results at float32 rounding "
                            "level, so resumed/sharded runs are bit-identical only with 1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--device", default=None)
        p.add_argument("--formats", nargs="*", default=[], choices=["png", "svg", "pdf"])
        p.set_defaults(func=cmd_trace)

    p = sub.add_parser("plot", help="re-render saved results without recomputing")
    p.add_argument("results", help="output folder of `negtrace trace`")
    p.add_argument("--formats", nargs="*", default=[], choices=["png", "svg", "pdf"])
    p.set_defaults(func=cmd_plot)

    from negtrace.data.build_cli import configure_build, run_build
    from negtrace.evaluate import configure_eval, run_eval
    from negtrace.finetune.cli import configure_finetune, run_finetune
    from negtrace.models.phantom_train import configure_phantom, run_phantom

    for name, helptext, configure, run in (
            ("build", "build benchmark JSONL (polarity | contextual | pairs)", configure_build, run_build),
            ("eval", "evaluate a model on the negation benchmarks", configure_eval, run_eval),
            ("phantom", "phantom world: build a dataset | train the embedded model", configure_phantom, run_phantom),
            ("finetune", "selective fine-tuning (NAST) with per-layer scales", configure_finetune, run_finetune)):
        p = sub.add_parser(name, help=helptext)
        configure(p)
        p.set_defaults(func=run)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
