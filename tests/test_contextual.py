import argparse
import json
from pathlib import Path

import pytest
from conftest import write_chexpert_csv

from negtrace.data.build_cli import configure_build, run_build
from negtrace.data.contextual import (
    build_contextual,
    candidate_claims,
    claim_holds,
    claim_text,
    read_attributes,
)
from negtrace.data.labels import read_labels
from negtrace.data.schema import ContextualItem, FindingAttributes, SchemaError, read_jsonl, write_jsonl


def write_labels(path: Path, studies):
    return write_chexpert_csv(path, [(f"imgs/{name}/view1_frontal.jpg", "Frontal", "PA", labels)
                                     for name, labels in studies])


def write_attributes(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


STUDIES = [
    ("patient1/study1", {"Pleural Effusion": 1, "Pneumothorax": 0, "Consolidation": 1, "Cardiomegaly": 1, "Edema": -1}),
    ("patient2/study1", {"Pleural Effusion": 1, "Pneumothorax": 1, "Fracture": 0}),
    ("patient3/study1", {"Cardiomegaly": 0, "Support Devices": 1}),
]
ATTRIBUTES = [
    {"study_id": "patient1/study1", "findings": {
        "Pleural Effusion": {"present": True, "side": "left", "severity": "small"},
        "Consolidation": {"present": True, "side": "right", "zone": "lower", "severity": "mild"},
        "Cardiomegaly": {"present": True, "severity": "moderate"},
        "Pneumothorax": {"present": False}}},
    {"study_id": "patient2/study1", "findings": {
        "Pleural Effusion": {"present": True, "side": "bilateral", "severity": "large"},
        "Pneumothorax": {"present": True}}},
]


@pytest.fixture()
def inputs(tmp_path):
    return write_labels(tmp_path / "labels.csv", STUDIES), write_attributes(tmp_path / "attrs.jsonl", ATTRIBUTES)


def truth_of(texts_to_holds, finding, attrs):
    claims = {c.text: c.holds for c in candidate_claims(finding, attrs, "s", True)}
    for text, holds in texts_to_holds.items():
        assert claims[text] is holds, text


def test_attribute_level_truth():
    left_small = FindingAttributes(present=True, side="left", severity="small")
    truth_of({
        "Small left pleural effusion.": True,
        "No right pleural effusion.": True,  # a left one is present
        "No left pleural effusion.": False,
        "Pleural effusion, not large.": True,
        "Pleural effusion, not small.": False,
        "No large pleural effusion.": True,
        "No small pleural effusion.": False,
        "Large left pleural effusion.": False,
        "Small right pleural effusion.": False,
        "No pleural effusion.": False,
        "Pleural effusion, not on the right.": True,
    }, "Pleural Effusion", left_small)
    truth_of({"No left pleural effusion.": False, "No right pleural effusion.": False,
              "No bilateral pleural effusion.": False,
              "Large left pleural effusion.": True},  # a bilateral effusion is also a left one
             "Pleural Effusion", FindingAttributes(present=True, side="bilateral", severity="large"))
    truth_of({"No large pneumothorax.": True, "No left pneumothorax.": True, "Small pneumothorax.": False,
              "Pneumothorax, not large.": False, "No pneumothorax.": True},
             "Pneumothorax", FindingAttributes(present=False))
    truth_of({"No consolidation in the right lower zone.": False, "No consolidation in the right upper zone.": True,
              "Mild consolidation in the right lower zone.": True, "Consolidation, not in the right lower zone.": False,
              "No left consolidation.": True, "Mild consolidation in both lower zones.": False},
             "Consolidation", FindingAttributes(present=True, side="right", zone="lower", severity="mild"))


def test_claim_text_examples():
    assert claim_text("Pleural Effusion", False, "location", side="right") == "No right pleural effusion."
    assert claim_text("Pleural Effusion", True, "severity", severity="large") == "Pleural effusion, not large."
    assert claim_text("Pneumothorax", False, "severity", severity="large") == "No large pneumothorax."
    assert claim_text("Consolidation", False, "location", side="right", zone="lower") == \
        "No consolidation in the right lower zone."
    with pytest.raises(ValueError, match="side unknown"):
        claim_holds(False, "location", FindingAttributes(present=True), side="left")


def test_items_have_one_true_candidate(inputs):
    labels, attrs = inputs
    built = build_contextual(read_labels(labels), read_attributes(attrs), seed=0, n_candidates=8)
    items = {item.item_id: item for item in built.items}
    assert len(items) == 4 + 3 + 2  # one per (study, finding) labelled 1 or 0; uncertain Edema skipped
    actual = {a["study_id"]: a["findings"] for a in ATTRIBUTES}
    for item in built.items:
        assert item.target.holds and not any(d.holds for d in item.distractors)
        assert 1 + len(item.distractors) <= 8 and item.variants
        assert all(c.study_id == item.study_id for c in item.candidates)
        for claim in item.candidates:  # recheck truth from the raw attribute dicts
            state = actual.get(item.study_id, {}).get(claim.finding)
            if state is not None:
                assert claim_holds(claim.present, claim.negation_scope, FindingAttributes(**state),
                                   claim.side, claim.zone, claim.severity) is claim.holds
    effusion = items["contextual/patient1/study1/Pleural Effusion"]
    assert effusion.image_path == "imgs/patient1/study1/view1_frontal.jpg"
    assert any(c.side or c.severity for c in effusion.candidates)


def test_no_attributes_are_invented_for_plain_labels(inputs):
    labels, attrs = inputs
    built = build_contextual(read_labels(labels), read_attributes(attrs))
    plain = [item for item in built.items if item.study_id == "patient3/study1"]
    assert len(plain) == 2
    # patient2's Pneumothorax has no attributes either: only finding-level claims about it.
    plain += [i for i in built.items if i.item_id == "contextual/patient2/study1/Pneumothorax"]
    for item in plain:
        for claim in item.candidates:
            if claim.finding == item.target.finding or item.study_id == "patient3/study1":
                assert claim.side is claim.zone is claim.severity is None
                assert claim.negation_scope in ("none", "finding")
    only_labels = build_contextual(read_labels(labels))
    assert all(c.negation_scope in ("none", "finding") and c.side is c.severity is None
               for item in only_labels.items for c in item.candidates)


def test_attributes_alone_and_determinism(inputs, tmp_path):
    _, attrs = inputs
    records = read_attributes(attrs)
    first = [i.to_dict() for i in build_contextual(None, records, seed=1).items]
    assert first == [i.to_dict() for i in build_contextual(None, records, seed=1).items]
    assert first != [i.to_dict() for i in build_contextual(None, records, seed=2).items]
    assert len(build_contextual(None, records, n_items=3).items) == 3
    out = tmp_path / "ctx.jsonl"
    write_jsonl(out, build_contextual(None, records).items)
    assert [i.to_dict() for i in read_jsonl(out, ContextualItem)] == \
        [i.to_dict() for i in build_contextual(None, records).items]


@pytest.mark.parametrize("findings, message", [
    ({"Pleural Effusion": {"present": True, "zone": "lower"}}, "takes no lung zone"),
    ({"Cardiomegaly": {"present": True, "severity": "large"}}, "severity of Cardiomegaly must be one of mild"),
    ({"Pneumothorax": {"present": False, "side": "left"}}, "absent, so it cannot have a side"),
    ({"Pneumothorax": {"present": "yes"}}, "present must be true or false"),
    ({"Heart Failure": {"present": True}}, "not one of the 13 findings"),
    ({"Edema": {"present": True, "extent": "diffuse"}}, "needs 'present' and allows side, zone, severity"),
])
def test_bad_attributes_name_file_and_line(tmp_path, findings, message):
    path = write_attributes(tmp_path / "a.jsonl", [ATTRIBUTES[1], {"study_id": "x", "findings": findings}])
    with pytest.raises(SchemaError, match=rf"a.jsonl:2: .*{message}"):
        read_attributes(path)


def test_attributes_that_contradict_or_miss_the_labels(inputs, tmp_path):
    labels, _ = inputs
    table = read_labels(labels)
    wrong = read_attributes(write_attributes(tmp_path / "w.jsonl", [
        {"study_id": "patient3/study1", "findings": {"Cardiomegaly": {"present": True}}}]))
    with pytest.raises(ValueError, match="labels say Cardiomegaly is absent but the attributes say present"):
        build_contextual(table, wrong)
    stray = read_attributes(write_attributes(tmp_path / "s.jsonl", [{"study_id": "nobody", "findings": {}}]))
    with pytest.raises(ValueError, match="1 attribute records match no study"):
        build_contextual(table, stray)
    with pytest.raises(ValueError, match="more than once"):
        read_attributes(write_attributes(tmp_path / "d.jsonl", ATTRIBUTES[:1] * 2))


def test_cli(inputs, tmp_path, capsys):
    labels, attrs = inputs
    parser = argparse.ArgumentParser()
    configure_build(parser)
    out = tmp_path / "ctx.jsonl"
    args = parser.parse_args(["contextual", "--labels", str(labels), "--attributes", str(attrs), "--out", str(out),
                              "--n-candidates", "5"])
    assert run_build(args) == 0
    assert json.loads(capsys.readouterr().out)["n_records"] == 9
    assert all(len(i.candidates) <= 5 for i in read_jsonl(out, ContextualItem))
    assert run_build(parser.parse_args(["contextual", "--out", str(out)])) == 2
    assert "needs --labels, --attributes" in capsys.readouterr().err


def test_phantom_world_attributes(tmp_path):
    phantom = pytest.importorskip("negtrace.data.phantom")
    phantom.build_phantom_dataset(tmp_path, n_train=12, n_val=0, n_test=0, size=32, seed=0, progress=False)
    table = read_labels(tmp_path / "labels_train.csv")
    records = read_attributes(tmp_path / "attributes_train.jsonl")  # phantom lines: "path", "spec", ... accepted
    built = build_contextual(table, records, attributes_complete=True, seed=0)
    assert built.stats["n_studies_with_attributes"] == 12
    assert len(built.items) == 12 * 13  # complete records: every finding is known, present or absent
    assert any(c.negation_scope in ("location", "severity") for item in built.items for c in item.candidates)
    for item in built.items:
        assert item.target.holds and not any(d.holds for d in item.distractors)
        assert (tmp_path / item.image_path).is_file()
    partial = build_contextual(table, records, seed=0)  # only what the labels and records state
    assert len(partial.items) < len(built.items)
