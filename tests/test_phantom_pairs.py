"""Phantom tracing pairs: true negated statements, equal token lengths, seeded."""

from __future__ import annotations

import json

import pytest

from negtrace.data.findings import ABSENT, FINDINGS
from negtrace.data.labels import read_labels
from negtrace.data.phantom_pairs import write_phantom_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_clip):
    folder = tmp_path_factory.mktemp("pairs")
    path = write_phantom_pairs(folder, tiny_clip.tokenizer, 32, n_images=24, progress=False)
    return folder, [json.loads(line) for line in path.read_text().splitlines()]


def test_each_pair_is_true_of_its_image_and_token_aligned(pairs, tiny_clip):
    folder, records = pairs
    assert records
    table = read_labels(folder / "labels_test.csv")
    row_of = {p: i for i, p in enumerate(table.image_paths)}
    for rec in records:
        assert (folder / rec["image"]).is_file()
        code = table.findings[row_of[rec["image"]], FINDINGS.index(rec["finding"])]
        assert code == ABSENT, "the negated (clean) statement must describe the image correctly"
        clean, corrupted = tiny_clip.tokenize([rec["clean"], rec["corrupted"]]).lengths.tolist()
        assert clean == corrupted
        assert rec["clean"].startswith("there is no ") and rec["corrupted"].startswith("there is a ")


def test_pairs_are_reproducible(pairs, tiny_clip, tmp_path):
    _, records = pairs
    again = write_phantom_pairs(tmp_path, tiny_clip.tokenizer, 32, n_images=24, progress=False)
    assert [json.loads(line) for line in again.read_text().splitlines()] == records


def test_unknown_finding_or_template_is_named(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="valid findings"):
        write_phantom_pairs(tmp_path, tiny_clip.tokenizer, 32, findings=("Effusion",))
    with pytest.raises(ValueError, match="known: there_is_no"):
        write_phantom_pairs(tmp_path, tiny_clip.tokenizer, 32, template_ids=("nope",))
