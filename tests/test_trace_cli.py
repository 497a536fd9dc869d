"""`negtrace trace` end to end, resume after interruption, and bad input."""

import json

import pytest
import torch

from negtrace.cli import main
from negtrace.patching.result import CTEResult
from negtrace.trace_job import read_records, run_trace

PAIRS = [{"clean": "there is no pleural effusion.", "corrupted": "there is a pleural effusion."},
         {"clean": "there is no pneumothorax."},
         {"clean": "lungs are clear without consolidation."}]


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_trace_then_plot_end_to_end(tmp_path, capsys):
    src = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    assert main(["trace", "--input", str(src), "--out", str(out), "--sites", "resid", "mlp"]) == 0
    printed = capsys.readouterr().out
    assert "strongest layer" in printed and "examples: 3" in printed
    agg = CTEResult.load(out / "cte")
    assert agg.sites == ("resid", "mlp") and agg.n is not None
    summary = json.loads((out / "cte.json").read_text())
    assert summary["n_examples"] == 3 and "per_layer_mean" in summary
    assert main(["plot", str(out)]) == 0


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_clip):
    records = read_records(_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    cfg = {"model": "tiny", "sites": ["resid"]}
    full = run_trace(tiny_clip, records, tmp_path / "full", cfg, tmp_path, progress=False)
    assert run_trace(tiny_clip, records, tmp_path / "cut", cfg, tmp_path, stop_after=1, progress=False) is None
    assert len(list((tmp_path / "cut" / "examples").glob("*.json"))) == 1
    resumed = run_trace(tiny_clip, records, tmp_path / "cut", cfg, tmp_path, progress=False)
    assert torch.equal(torch.nan_to_num(full.values, 9.0), torch.nan_to_num(resumed.values, 9.0))


def test_folder_of_another_configuration_is_refused(tmp_path, tiny_clip):
    records = read_records(_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1]))
    run_trace(tiny_clip, records, tmp_path / "run", {"sites": ["resid"]}, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration.*sites"):
        run_trace(tiny_clip, records, tmp_path / "run", {"sites": ["mlp"]}, tmp_path, progress=False)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_records(path)


def test_missing_image_file(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"clean": "no effusion.", "image": "missing.png"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_records(path)


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    assert main(["trace", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
