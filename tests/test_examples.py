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


def test_trained_weights_are_required_without_offline_random(tmp_path):
    proc = _run(ROOT / "examples" / "trace_chexzero.py", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "--weights" in proc.stderr
    assert not (tmp_path / "out").exists()
