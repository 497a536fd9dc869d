import argparse
import csv
import gzip
import json
import random
import re
import time
from pathlib import Path

import pytest
from conftest import write_chexpert_csv

from negtrace.data.build_cli import configure_build, run_build
from negtrace.data.findings import FINDINGS, LABEL_COLUMNS
from negtrace.data.labels import read_labels
from negtrace.data.polarity import (
    FINDING_PHRASES,
    NORMAL_PHRASES,
    PATTERNS,
    NoEligibleStudiesError,
    build_polarity,
    render_option,
)
from negtrace.data.schema import PolarityItem, SchemaError, read_jsonl, write_jsonl


def write_labels(path: Path, studies):
    """studies: list of (study name, view, {column: value}); one image row each."""
    rows = [(f"CheXpert-v1.0-small/train/{name}/view1_{view.lower()}.jpg", view, "", labels)
            for name, view, labels in studies]
    return write_chexpert_csv(path, rows)


def labels_of(absent=(), present=(), uncertain=(), **extra):
    out = {f: 0 for f in absent} | {f: 1 for f in present} | {f: -1 for f in uncertain}
    return out | extra


HAND_MADE = [
    ("patient1/study1", "Frontal", labels_of(["Cardiomegaly", "Edema", "Pneumothorax"], ["Pleural Effusion", "Support Devices"],
                                             ["Atelectasis"])),  # exactly 3 absent + 2 present
    ("patient1/study2", "Frontal", labels_of(["Edema", "Fracture"], ["Lung Opacity", "Consolidation", "Pneumonia"])),
    ("patient2/study1", "Frontal", labels_of(["Edema", "Fracture", "Cardiomegaly"], ["Lung Opacity"],
                                             ["Pneumonia", "Atelectasis"])),
    # "No Finding" is not a finding: its 1 does not count as a second present finding.
    ("patient3/study1", "Frontal", labels_of(["Edema", "Fracture", "Cardiomegaly"], ["Lung Opacity"]) | {"No Finding": 1}),
    ("patient4/study1", "Lateral", labels_of(["Edema", "Fracture", "Cardiomegaly"], ["Lung Opacity", "Atelectasis"])),
    ("patient5/study1", "Frontal", labels_of(["Edema", "Fracture", "Cardiomegaly", "Lung Lesion"],
                                             ["Lung Opacity", "Atelectasis", "Pleural Other"])),
]


def random_studies(n, seed=0):
    rng = random.Random(seed)
    return [(f"patient{100 + k}/study1", "Frontal", {f: rng.choice([1, 0, 0, -1, None, None]) for f in LABEL_COLUMNS})
            for k in range(n)]


def expected_eligible(studies, require_frontal=True):
    keep = []
    for name, view, labels in studies:
        values = [labels.get(f) for f in FINDINGS]
        if values.count(0) >= 3 and values.count(1) >= 2 and (view == "Frontal" or not require_frontal):
            keep.append(name)
    return keep


# -- parsing options back into label vectors (independent of the builder's code) ----------

def _alternation(phrases):
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b")


NAMED = {p: f for f in FINDINGS for p in FINDING_PHRASES[f]}
NORMAL = {p: f for f in FINDINGS for p in NORMAL_PHRASES[f]}
NAMED_RE = _alternation(NAMED)
ANY_RE = _alternation({**NAMED, **NORMAL})
PREFIX_CUE = re.compile(r"\b(no|not|without|free of)\b")
NEGATION_WORD = re.compile(r"\b(no|not|without|absent|free|negative|nor)\b")


def parse_negated(text):
    """{finding: 1 asserted present / 0 asserted absent} and the present findings' wording."""
    result, wording = {}, []
    for clause in text.lower().rstrip(".").split(";"):
        clause = clause.strip()
        postfix = clause.endswith(" absent") or clause.endswith(" not seen")
        polarity, pos = 1, 0
        for m in NAMED_RE.finditer(clause):
            gap = clause[pos:m.start()]
            if PREFIX_CUE.search(gap):
                polarity = 0
            elif re.search(r"\bwith\b", gap):
                polarity = 1
            value = 0 if postfix else polarity
            finding = NAMED[m.group()]
            assert finding not in result, f"{finding} mentioned twice in {text!r}"
            result[finding] = value
            if value:
                wording.append(m.group())
            pos = m.end()
    return result, wording


def parse_affirmative(text):
    assert not NEGATION_WORD.search(text.lower()), f"negation word in affirmative form {text!r}"
    result, wording = {}, []
    for m in ANY_RE.finditer(text.lower()):
        phrase = m.group()
        finding = NAMED.get(phrase) or NORMAL[phrase]
        assert finding not in result, f"{finding} mentioned twice in {text!r}"
        result[finding] = 1 if phrase in NAMED else 0
        if phrase in NAMED:
            wording.append(phrase)
    return result, wording


def check_item(item: PolarityItem, study_labels):
    assert len(item.options_negated) == len(item.options_affirmative) == 4
    vectors = [tuple(v[f] for f in item.findings) for v in item.option_labels]
    assert len(set(vectors)) == 4
    truth = {f: study_labels[f] for f in item.findings}
    assert item.option_labels[item.answer] == truth
    assert set(truth.values()) == {0, 1}
    for negated, affirmative, labels in zip(item.options_negated, item.options_affirmative, item.option_labels,
                                            strict=True):
        parsed_neg, present_neg = parse_negated(negated)
        parsed_aff, present_aff = parse_affirmative(affirmative)
        assert parsed_neg == labels, (negated, labels)
        assert parsed_aff == labels, (affirmative, labels)
        assert present_neg == present_aff  # identical wording, same order
        assert (negated == affirmative) == (0 not in labels.values())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    studies = HAND_MADE + random_studies(300)
    path = write_labels(tmp_path_factory.mktemp("labels") / "train.csv", studies)
    return path, studies


def test_filter_rule(synthetic):
    path, studies = synthetic
    built = build_polarity(read_labels(path), seed=0)
    assert [item.study_id for item in built.items] == expected_eligible(studies)
    assert {"patient1/study1", "patient5/study1"} <= {item.study_id for item in built.items}
    assert built.stats["n_eligible"] == len(built.items) and built.stats["n_studies"] == len(studies)
    with_lateral = build_polarity(read_labels(path), require_frontal=False)
    assert [i.study_id for i in with_lateral.items] == expected_eligible(studies, require_frontal=False)
    assert "patient4/study1" in {i.study_id for i in with_lateral.items}


def test_options_agree_with_labels(synthetic):
    path, studies = synthetic
    labels = {name: lab for name, _, lab in studies}
    items = build_polarity(read_labels(path), seed=3).items
    for item in items:
        check_item(item, labels[item.study_id])
    assert {item.pattern for item in items} == set(PATTERNS)
    assert {item.answer for item in items} == {0, 1, 2, 3}


def test_determinism_by_seed(synthetic):
    table = read_labels(synthetic[0])
    first = [i.to_dict() for i in build_polarity(table, seed=7).items]
    assert first == [i.to_dict() for i in build_polarity(table, seed=7).items]
    assert first != [i.to_dict() for i in build_polarity(table, seed=8).items]
    subset = build_polarity(table, seed=7, n_items=5).items
    assert len(subset) == 5
    by_study = {d["study_id"]: d for d in first}
    assert all(item.to_dict() == by_study[item.study_id] for item in subset)  # an item depends on its study only


def test_render_option_examples():
    assert render_option("but_not", ["cardiomegaly", "edema"], ["pneumothorax"], ["fully expanded lungs"]) == (
        "Cardiomegaly, edema, but not pneumothorax.", "Cardiomegaly, edema, and fully expanded lungs.")
    assert render_option("no_with", ["cardiomegaly"], ["effusion", "pneumothorax"],
                         ["sharp costophrenic angles", "fully expanded lungs"]) == (
        "No effusion or pneumothorax, with cardiomegaly.",
        "Sharp costophrenic angles and fully expanded lungs, with cardiomegaly.")
    assert render_option("without", ["cardiomegaly", "edema"], ["pneumothorax"], ["fully expanded lungs"])[0] == \
        "Cardiomegaly and edema without pneumothorax."
    with pytest.raises(ValueError):
        render_option("but_not", [], ["edema"], ["normal pulmonary vasculature"])


def test_every_finding_has_several_normal_counterparts():
    assert set(NORMAL_PHRASES) == set(FINDINGS) == set(FINDING_PHRASES)
    assert all(len(v) >= 3 for v in NORMAL_PHRASES.values())
    assert NORMAL_PHRASES["Cardiomegaly"][0] == "normal heart size"
    assert "sharp costophrenic angles" in NORMAL_PHRASES["Pleural Effusion"]
    assert "fully expanded lungs" in NORMAL_PHRASES["Pneumothorax"]


def test_paraphrase_callable(synthetic):
    items = build_polarity(read_labels(synthetic[0]), paraphrase=lambda s: s.upper(), n_items=3).items
    assert all(item.paraphrased and item.options_negated[0].isupper() for item in items)


def test_no_eligible_study_explains_why(tmp_path):
    studies = [("patient1/study1", "Frontal", labels_of(["Edema", "Fracture"], ["Lung Opacity", "Pneumonia"])),
               ("patient2/study1", "Frontal", labels_of(["Edema", "Fracture", "Cardiomegaly"], ["Lung Opacity"]))]
    table = read_labels(write_labels(tmp_path / "x.csv", studies))
    with pytest.raises(NoEligibleStudiesError) as err:
        build_polarity(table)
    message = str(err.value)
    assert "read 2 studies (2 rows)" in message
    assert "1 had fewer than 3 absent findings (most in any study: 3)" in message
    assert "1 had fewer than 2 present findings (most in any study: 2)" in message


def test_jsonl_round_trip_and_errors(synthetic, tmp_path):
    items = build_polarity(read_labels(synthetic[0]), n_items=4).items
    out = tmp_path / "bench" / "polarity.jsonl"
    assert write_jsonl(out, items) == 4
    assert [i.to_dict() for i in read_jsonl(out, PolarityItem)] == [i.to_dict() for i in items]
    assert [p.name for p in out.parent.iterdir()] == ["polarity.jsonl"]  # no temporary file left
    lines = out.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["option_labels"][0] = bad["option_labels"][1]
    out.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    with pytest.raises(SchemaError, match=r"polarity.jsonl:2: .*distinct"):
        read_jsonl(out, PolarityItem)
    del bad["answer"]
    out.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SchemaError, match=r":2: PolarityItem: missing fields: answer"):
        read_jsonl(out, PolarityItem)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    configure_build(parser)
    return run_build(parser.parse_args(argv))


def test_cli(synthetic, tmp_path, capsys):
    out = tmp_path / "polarity.jsonl"
    assert run_cli("polarity", "--labels", str(synthetic[0]), "--out", str(out), "--n-items", "6", "--seed", "2") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_records"] == 6 and len(read_jsonl(out, PolarityItem)) == 6
    assert json.loads((tmp_path / "polarity.jsonl.stats.json").read_text())["n_records"] == 6
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Edema\nx.jpg,1.0\n")
    assert run_cli("polarity", "--labels", str(bad), "--out", str(tmp_path / "o.jsonl")) == 2
    assert "missing label columns" in capsys.readouterr().err


def test_real_chexpert_file():
    xrv = pytest.importorskip("torchxrayvision")
    path = Path(xrv.__file__).parent / "data" / "chexpert_train.csv.gz"
    started = time.perf_counter()
    table = read_labels(path)
    built = build_polarity(table, seed=0)
    seconds = time.perf_counter() - started
    print(f"\nreal CheXpert: {json.dumps(built.stats)}; read + build {seconds:.2f}s")
    assert seconds < 20

    # The filter, recomputed from the raw file with the csv module (one row per study).
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        finding_cols = [header.index(c) for c in FINDINGS]
        frontal_col = header.index("Frontal/Lateral")
        studies, frontal = {}, set()
        for row in reader:
            study = row[0].rsplit("/", 1)[0].split("train/")[-1]
            studies.setdefault(study, [row[c] for c in finding_cols])
            if row[frontal_col] == "Frontal":
                frontal.add(study)
    eligible = {s for s, cells in studies.items()
                if cells.count("0.0") >= 3 and cells.count("1.0") >= 2 and s in frontal}
    assert {item.study_id for item in built.items} == eligible
    assert built.stats["n_items"] == len(eligible) > 1000

    for item in built.items:
        check_item(item, {f: {"1.0": 1, "0.0": 0}.get(c) for f, c in zip(FINDINGS, studies[item.study_id], strict=True)})
    assert [i.to_dict() for i in build_polarity(table, seed=0, n_items=50).items] == \
        [i.to_dict() for i in build_polarity(table, seed=0, n_items=50).items]
