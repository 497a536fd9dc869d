"""``negtrace build polarity|contextual|pairs``: write validated benchmark JSONL files.

Every record is validated when built and the file is written atomically; a summary of
counts and timing goes to stdout as one JSON object (and next to the output as
``<out>.stats.json``). Input problems exit with status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from negtrace.data.findings import FINDINGS

__all__ = ["configure_build", "run_build", "make_token_counter"]


def configure_build(parser: argparse.ArgumentParser) -> None:
    """Add the ``polarity``, ``contextual`` and ``pairs`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{polarity,contextual,pairs}")

    polarity = sub.add_parser("polarity", help="polarity MCQ (negated vs affirmative wording) from labels")
    _common(polarity, labels_required=True)
    polarity.add_argument("--n-items", type=int, help="number of items (default: every eligible study)")
    polarity.add_argument("--allow-lateral", action="store_true",
                          help="keep studies whose only image is lateral (dropped by default)")

    contextual = sub.add_parser("contextual", help="contextual claims with attribute-level negations")
    _common(contextual, labels_required=False)
    contextual.add_argument("--attributes", type=Path,
                            help="JSONL of structured finding attributes per image (e.g. the phantom world's)")
    contextual.add_argument("--attributes-complete", action="store_true",
                            help="each attribute record lists every present finding, so unlisted ones are "
                                 "absent (true of the phantom world)")
    contextual.add_argument("--n-items", type=int, help="number of (study, finding) items (default: all)")
    contextual.add_argument("--n-candidates", type=int, default=10,
                            help="claims per item, the true one included (default 10)")

    pairs = sub.add_parser("pairs", help="minimal pairs (negated / affirmative) for causal tracing")
    _common(pairs, labels_required=False)
    pairs.add_argument("--tokenizer", default="whitespace",
                       help="token counter: whitespace, clip-bpe (CLIP/CheXzero BPE), hf:NAME_OR_PATH, "
                            "or model:SPEC (negtrace.load)")
    pairs.add_argument("--findings", help="comma-separated findings (default: all 13)")
    pairs.add_argument("--images-per-finding", type=int, default=0,
                       help="tie each pair to up to N studies where the finding is absent (needs --labels)")


def _common(parser: argparse.ArgumentParser, labels_required: bool) -> None:
    parser.add_argument("--labels", type=Path, required=labels_required,
                        help="CheXpert train.csv or MIMIC-CXR chexpert.csv (.csv or .csv.gz)")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL path")
    parser.add_argument("--seed", type=int, default=0)


def make_token_counter(spec: str) -> Callable[[str], int]:
    """A ``text -> number of tokens`` function from a ``--tokenizer`` spec."""
    if spec == "whitespace":
        from negtrace.data.pairs import whitespace_count

        return whitespace_count
    if spec == "clip-bpe":
        from open_clip.tokenizer import SimpleTokenizer  # bundled vocabulary, no download

        bpe = SimpleTokenizer()
        return lambda text: len(bpe.encode(text)) + 2  # + start and end tokens
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec[3:])
        return lambda text: len(tok(text)["input_ids"])
    if spec.startswith("model:"):
        from negtrace import load

        model = load(spec[6:])
        return lambda text: int(model.tokenize([text]).lengths[0])
    raise ValueError(f"unknown tokenizer {spec!r}; use whitespace, clip-bpe, hf:NAME_OR_PATH or model:SPEC")


def _build(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    from negtrace.data.labels import read_labels

    table = read_labels(args.labels) if args.labels else None
    if args.benchmark == "polarity":
        from negtrace.data.polarity import build_polarity

        built = build_polarity(table, seed=args.seed, n_items=args.n_items, require_frontal=not args.allow_lateral)
        return built.items, built.stats
    if args.benchmark == "contextual":
        from negtrace.data.contextual import build_contextual, read_attributes

        if table is None and args.attributes is None:
            raise ValueError("contextual needs --labels, --attributes, or both")
        attributes = read_attributes(args.attributes) if args.attributes else []
        built = build_contextual(table, attributes, attributes_complete=args.attributes_complete, seed=args.seed,
                                 n_items=args.n_items, n_candidates=args.n_candidates)
        return built.items, built.stats
    from negtrace.data.pairs import build_tracing_pairs

    findings = [f.strip() for f in args.findings.split(",")] if args.findings else list(FINDINGS)
    built = build_tracing_pairs(findings, count_tokens=make_token_counter(args.tokenizer), table=table,
                                images_per_finding=args.images_per_finding, seed=args.seed)
    stats = {**built.stats, "tokenizer": args.tokenizer,
             "dropped": [vars(d) for d in built.dropped]}
    return built.pairs, stats


def run_build(args: argparse.Namespace) -> int:
    """Run ``negtrace build``; returns the process exit code."""
    from negtrace.data.schema import write_jsonl

    started = time.perf_counter()
    try:
        records, stats = _build(args)
    except (OSError, ValueError) as e:
        print(f"negtrace build {args.benchmark}: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"negtrace build {args.benchmark}: nothing to write ({json.dumps(stats)})", file=sys.stderr)
        return 2
    write_jsonl(args.out, records)
    stats = {"benchmark": args.benchmark, "out": str(args.out), "n_records": len(records), **stats,
             "total_seconds": round(time.perf_counter() - started, 3)}
    stats_path = args.out.with_name(args.out.name + ".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats))
    return 0
