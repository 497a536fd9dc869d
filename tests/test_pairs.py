import argparse
import csv
import json

import pytest

from negtrace.data.build_cli import configure_build, make_token_counter, run_build
from negtrace.data.findings import FINDINGS, LABEL_COLUMNS
from negtrace.data.labels import read_labels
from negtrace.data.pairs import DEFAULT_TEMPLATES, PairTemplate, build_tracing_pairs
from negtrace.data.schema import TracingPair, read_jsonl


def test_pairs_differ_only_in_the_cue():
    built = build_tracing_pairs()
    assert len(built.pairs) == len(FINDINGS) * len(DEFAULT_TEMPLATES) and not built.dropped
    for pair in built.pairs:
        start, end = pair.cue_span
        template = next(t for t in DEFAULT_TEMPLATES if t.template_id == pair.template_id)
        assert pair.cue == template.cue
        assert pair.corrupted == pair.clean[:start] + template.counterpart + pair.clean[end:]
        assert pair.n_tokens == len(pair.clean.split())
    example = next(p for p in built.pairs if p.pair_id == "there_is_no/Pleural Effusion")
    assert (example.clean, example.corrupted) == ("there is no pleural effusion.", "there is a pleural effusion.")


def test_unequal_token_counts_are_dropped_with_reasons():
    templates = [PairTemplate("short", "there is {cue} {finding}.", "no", "a"),
                 PairTemplate("long", "{finding} is {cue}.", "absent", "present")]
    built = build_tracing_pairs(["Edema", "Fracture"], templates, count_tokens=len)  # characters as tokens
    assert [p.template_id for p in built.pairs] == []
    assert {(d.template_id, d.finding) for d in built.dropped} == {
        ("short", "Edema"), ("short", "Fracture"), ("long", "Edema"), ("long", "Fracture")}
    # "there is no pulmonary edema." has 28 characters, "there is a pulmonary edema." 27.
    assert [d.reason for d in built.dropped] == [f"token counts differ ({a} vs {b})"
                                                 for a, b in [(28, 27), (26, 27), (21, 20), (19, 20)]]
    assert built.stats["n_pairs"] == 0 and built.stats["n_dropped"] == 4
    kept = build_tracing_pairs(["Edema"], [PairTemplate("same", "{cue} {finding}", "ab", "cd")], tokenize=list)
    assert len(kept.pairs) == 1 and kept.pairs[0].n_tokens == len("ab pulmonary edema")


def test_argument_checks():
    with pytest.raises(ValueError, match="not both"):
        build_tracing_pairs(count_tokens=len, tokenize=list)
    with pytest.raises(ValueError, match="unknown finding"):
        build_tracing_pairs(["Heart Failure"])
    with pytest.raises(ValueError, match="needs a label table"):
        build_tracing_pairs(images_per_finding=2)
    with pytest.raises(ValueError, match="exactly one"):
        PairTemplate("bad", "no {finding}", "no", "a")


@pytest.fixture()
def labels(tmp_path):
    path = tmp_path / "mimic.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id", "study_id", *LABEL_COLUMNS])
        for k in range(6):
            edema = ["0.0", "1.0", ""][k % 3]
            writer.writerow(["1000", str(500 + k), *["" if c != "Edema" else edema for c in LABEL_COLUMNS]])
    return path


def test_pairs_tied_to_images_where_the_finding_is_absent(labels):
    table = read_labels(labels)
    built = build_tracing_pairs(["Edema", "Fracture"], DEFAULT_TEMPLATES[:2], table=table, images_per_finding=5)
    edema = [p for p in built.pairs if p.finding == "Edema"]
    assert sorted({p.study_id for p in edema}) == ["500", "503"]  # the studies with Edema = 0
    assert all(p.subject_id == "1000" and p.pair_id.endswith(p.study_id) for p in edema)
    assert {d.reason for d in built.dropped} == {"no study has this finding labelled absent"}
    one = build_tracing_pairs(["Edema"], DEFAULT_TEMPLATES[:1], table=table, images_per_finding=1, seed=3)
    assert len(one.pairs) == 1


def test_clip_bpe_keeps_the_default_pairs():
    count = make_token_counter("clip-bpe")
    built = build_tracing_pairs(count_tokens=count)
    assert not built.dropped
    assert next(p for p in built.pairs if p.pair_id == "there_is_no/Edema").n_tokens == count("there is no pulmonary edema.")


def test_cli(labels, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_build(parser)
    out = tmp_path / "pairs.jsonl"
    args = parser.parse_args(["pairs", "--labels", str(labels), "--out", str(out), "--findings", "Edema, Fracture",
                              "--images-per-finding", "2"])
    assert run_build(args) == 0
    stats = json.loads(capsys.readouterr().out)
    pairs = read_jsonl(out, TracingPair)
    assert stats["n_records"] == len(pairs) == 2 * len(DEFAULT_TEMPLATES)
    assert stats["n_dropped"] == len(DEFAULT_TEMPLATES)  # Fracture is never labelled absent
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_token_counter("sentencepiece")
