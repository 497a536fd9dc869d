import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_nast_phantom_end_to_end_tiny(tmp_path, capsys):
    bench = _module("nast_phantom")
    code = bench.main(["--tiny", "--seeds", "0", "--steps", "1", "--n-boot", "20", "--n-test", "60", "--n-items", "8",
                       "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["baseline", "uniform", "shuffled", "nast"]
    baseline = [float(re.match(r"\s*([-\d.]+)", c).group(1)) for c in table[2].split("|")[3:-1]]
    assert baseline[3:] == [1.0, 1.0]  # the baseline retains all of its own alignment
    assert baseline[2] == pytest.approx(baseline[1] - baseline[0], abs=2e-3)  # gap = affirmative - negated
    assert (tmp_path / "out" / "nast_scales.json").is_file()
    assert "| nast | 1 |" in capsys.readouterr().out


def test_bench_finetune_prints_ratio(capsys):
    _module("bench_finetune").main(["--steps", "2", "--warmup", "0", "--batch", "2"])
    out = capsys.readouterr().out
    assert re.search(r"median of paired ratios \d+\.\d{3}", out) and "lr (per-layer groups)" in out
