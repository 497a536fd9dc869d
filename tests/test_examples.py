"""Every ``examples/*.py`` runs end to end with ``--offline-random`` and writes its outputs.

Setup and run (from the repository root)::

    pip install -e ".[dev]"
    python -m pytest tests/test_examples.py

Each example is run as a user would run it (``python examples/trace_x.py --offline-random
--out DIR``) in a subprocess with the Hugging Face Hub switched off, so a hidden download
or a crash fails the test. Files starting with ``_`` are shared helpers, not examples.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from negtrace.patching.result import CTEResult

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
OUTPUTS = ("heatmap.html", "cte.safetensors", "cte.json", "summary.json")


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_three_model_families_have_examples():
    assert {p.stem for p in EXAMPLES} >= {"trace_biomedclip", "trace_chexzero", "trace_pubmedclip"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_offline_and_writes_its_outputs(script, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = _run(script, "--offline-random", "--out", str(out), cwd=tmp_path)
    print(f"{script.name}: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] is True and summary["n_pairs"] > 0
    assert summary["n_flagged"] < summary["n_pairs"]
    assert set(summary["strongest"]) == {"resid", "attn", "mlp"}
    agg = CTEResult.load(out / "cte")
    assert agg.sites == ("resid", "attn", "mlp") and agg.is_aggregate
    for site, best in summary["strongest"].items():
        assert 1 <= best["layer"] <= agg.n_layers
        assert math.isclose(best["mean_cte"], float(agg.per_layer(site, "mean")[best["layer"]]), rel_tol=1e-5)
    assert torch.isfinite(agg.values[:, 1:]).any()
    assert "random weights" in proc.stdout and "strongest block per site" in proc.stdout
    assert "<html" in (out / "heatmap.html").read_text()[:2000].lower()
    if script.stem == "finetune_nast":  # the trace above, then scales -> fine-tuning -> evaluation
        _check_finetune_outputs(out, runs=("nast", "uniform", "shuffled"), weights="model.safetensors")


def _check_finetune_outputs(out: Path, runs: tuple[str, ...], weights: str) -> dict:
    from negtrace.finetune.scales import LayerScales

    scales = LayerScales.load(out / "scales.json")
    assert len(scales) > 0 and max(scales.values()) == 1.0 and min(scales.values()) >= 0.05 - 1e-9
    results = json.loads((out / "results.json").read_text())
    assert results["random_weights"] is True and results["n_items"] > 0 and set(results["runs"]) == set(runs)
    assert set(results["before"]) == {"negated", "affirmative", "gap"}
    for name, run in results["runs"].items():
        assert run["steps"] == results["budget"]["steps"] and math.isfinite(run["loss_last"]), name
        for key, value in run["after"].items():
            assert math.isfinite(value) and math.isfinite(results["before"][key]), (name, key)
        folder = out / "finetune" / name
        for f in ("metrics.jsonl", "eval_before.json", "eval_after.json", "run.json", weights):
            assert (folder / f).is_file() and (folder / f).stat().st_size > 0, (name, f)
        evaluation = json.loads((folder / "eval_after.json").read_text())["polarity"]
        assert math.isclose(evaluation["accuracy_negated"]["value"], run["after"]["negated"])
    if "uniform" in runs:
        assert set(results["runs"]["uniform"]["scales"].values()) == {1.0}
    assert "| before |" in (out / "results.md").read_text()
    return results


def test_finetune_example_with_lora_on_a_bert_text_tower(tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = _run(ROOT / "examples" / "finetune_nast.py", "--offline-random", "--arch", "biomedclip", "--method",
                "lora", "--controls", "--out", str(out), cwd=tmp_path)
    print(f"finetune_nast.py --method lora: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = _check_finetune_outputs(out, runs=("nast",), weights="adapter.safetensors")
    assert results["method"] == "lora"
    assert json.loads((out / "finetune" / "nast" / "adapter.json").read_text())["format"] == "negtrace-lora"


def test_trained_weights_are_required_without_offline_random(tmp_path):
    proc = _run(ROOT / "examples" / "trace_chexzero.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "--weights" in proc.stderr
    assert not (tmp_path / "out").exists()
