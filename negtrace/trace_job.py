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

from tqdm.auto import tqdm

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


def _load_image(model, base: Path, ref: str):
    from PIL import Image

    path = base / ref if (base / ref).is_file() else Path(ref)
    return model.preprocess(Image.open(path).convert("RGB"))[None]


def run_trace(model, records: list[TraceRecord], out: Path, config: dict, base: Path, *, corrupt="pair",
              sites=("resid",), metric=None, heads=False, window=1, samples=10, stop_after: int | None = None,
              progress: bool = True) -> CTEResult | None:
    """Trace every record (skipping those already on disk), then aggregate. ``stop_after``
    simulates an interruption (tests)."""
    from .patching.engine import patch

    examples = prepare_output(out, config)
    results: list[CTEResult] = []
    done = 0
    for i, rec in enumerate(tqdm(records, desc="tracing", disable=not progress)):
        target = examples / f"{i:05d}"
        if target.with_suffix(".json").exists() and target.with_suffix(".safetensors").exists():
            results.append(CTEResult.load(target))
            continue
        if stop_after is not None and done >= stop_after:
            return None
        image = _load_image(model, base, rec.image) if rec.image else None
        res = patch(model, rec.clean, corrupted=rec.corrupted if corrupt == "pair" else None, image=image,
                    corrupt=corrupt, sites=tuple(sites), metric=metric, heads=heads, window=window,
                    samples=samples, progress=False)
        res.save(target)
        results.append(res)
        done += 1
    agg = aggregate(results)
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
