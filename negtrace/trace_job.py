"""The tracing job behind ``negtrace trace``: read records, patch, aggregate, write — resumably.

Each example's result is written as soon as it is computed (``examples/00042.{json,
safetensors}``), so an interrupted run resumes from the examples already done. The run's
configuration is stored in ``config.json``; a folder holding results of a different
configuration is refused rather than mixed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .patching.result import CTEResult, _atomic, aggregate


@dataclass(frozen=True)
class TraceRecord:
    clean: str
    corrupted: str | None = None
    image: str | None = None


def read_records(path: str | Path) -> list[TraceRecord]:
    """JSONL tracing pairs (``clean``/``text``, optional ``corrupted``/``foil``, ``image``) or CSV
    with text/foil/image columns. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    records: list[TraceRecord] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV input needs a 'text' column (optional: 'foil', 'image'); "
                                 f"found {reader.fieldnames}")
            for row in reader:
                records.append(TraceRecord(row["text"], row.get("foil") or None, row.get("image") or None))
    else:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from exc
            text = obj.get("clean", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno}: record needs a non-empty 'clean' (or 'text') string")
            records.append(TraceRecord(text, obj.get("corrupted", obj.get("foil")), obj.get("image")))
    if not records:
        raise ValueError(f"{path}: no records")
    base = path.parent
    for i, r in enumerate(records):
        if r.image is not None and not (base / r.image).is_file() and not Path(r.image).is_file():
            raise FileNotFoundError(f"{path}: record {i + 1} names image {r.image!r}, which does not exist")
    return records


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output(out: Path, config: dict) -> Path:
    try:
        (out / "examples").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot write to output folder {out}: {exc.strerror}") from exc
    cfg_path = out / "config.json"
    config = {**config, "hash": _config_hash(config)}
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("hash") != config["hash"]:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k) and k != "hash")
            raise ValueError(f"{out} holds results of a different configuration (differs in {diff}); "
                             "use a new output folder, or delete this one to start over")
    else:
        _atomic(cfg_path, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return out / "examples"


def _done(examples: Path, n: int) -> list[int]:
    """Indices whose result files are both on disk (from an earlier, interrupted run)."""
    return [i for i in range(n) if (examples / f"{i:05d}.json").exists()
            and (examples / f"{i:05d}.safetensors").exists()]


def run_trace(model, records: list[TraceRecord], out: Path, config: dict, base: Path, *, corrupt="pair",
              sites=("resid",), metric=None, heads=False, window=1, samples=10, batch_size: int = 1, seed: int = 0,
              stop_after: int | None = None, progress: bool = True) -> CTEResult | None:
    """Trace every record (skipping those already on disk), then aggregate and write the summary.

    Under ``torch.distributed`` (e.g. ``torchrun``) records are sharded over ranks (see
    :mod:`negtrace.patching.distributed`); every rank returns the same aggregate and only rank 0
    writes files. Each result is written as soon as rank 0 has it, so an interrupted run
    resumes. ``batch_size`` records share one sweep: faster, but results then depend on the
    batch's composition at float32 rounding level (~1e-7), so resumed or sharded runs match an
    uninterrupted one bit for bit only with ``batch_size=1`` (the default). ``stop_after``
    traces only that many new records and returns None (simulates an interruption, for tests)."""
    from .patching.distributed import broadcast_from_rank0, patch_dataset, rank_and_world

    rank, _ = rank_and_world()
    examples = out / "examples"

    def setup() -> list[int]:
        prepare_output(out, config)
        return _done(examples, len(records))
    done = broadcast_from_rank0(setup)  # one view of the folder for every rank, taken before anything is written
    done_set = set(done)
    todo = [i for i in range(len(records)) if i not in done_set]
    interrupted = stop_after is not None and len(todo) > stop_after
    todo = todo[:stop_after] if stop_after is not None else todo

    def write(i: int, res: CTEResult) -> None:
        if rank == 0:
            res.save(examples / f"{i:05d}")
    new = patch_dataset(model, records, indices=todo, base=base, corrupt=corrupt, batch_size=batch_size, seed=seed,
                        progress=progress, on_result=write, sites=tuple(sites), metric=metric, heads=heads,
                        window=window, samples=samples)
    by_index = dict(zip(todo, new, strict=True))
    for i, res in by_index.items():  # results computed on other ranks
        if rank == 0 and not (examples / f"{i:05d}.json").exists():
            res.save(examples / f"{i:05d}")
    if interrupted:
        return None
    results = [by_index[i] if i in by_index else CTEResult.load(examples / f"{i:05d}") for i in range(len(records))]
    agg = aggregate(results)
    if rank == 0:
        agg.save(out / "cte")
        summary = summarize(agg, results)
        _atomic(out / "cte.json", lambda p: Path(p).write_text(json.dumps({**agg.metadata(), **summary}, indent=2)))
    return agg


def summarize(agg: CTEResult, results: list[CTEResult]) -> dict:
    per_layer = {site: [round(float(v), 4) for v in agg.per_layer(site)] for site in agg.sites}
    flagged = [{"index": i, "text": r.text, "denominator": r.denominator} for i, r in enumerate(results) if r.flagged]
    resid = agg.site(agg.sites[0])
    flat = [(float(resid[layer, p]), layer, agg.labels[p]) for layer in range(resid.shape[0])
            for p in range(resid.shape[1]) if resid[layer, p] == resid[layer, p]]
    top = sorted(flat, reverse=True)[:5]
    return {"n_examples": len(results), "n_flagged": len(flagged), "flagged": flagged, "per_layer_mean": per_layer,
            "top_cells": [{"cte": round(v, 4), "layer": layer, "role": role} for v, layer, role in top]}
