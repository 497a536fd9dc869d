import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from negtrace.data.contextual import build_contextual, read_attributes
from negtrace.data.labels import read_labels
from negtrace.data.schema import ContextualClaim, ContextualItem, PolarityItem
from negtrace.evaluate import (
    ImageResolver,
    bootstrap_ci,
    contextual_figure,
    evaluate_contextual,
    evaluate_polarity,
    load_image,
    polarity_correct,
    polarity_figure,
    save_results,
)

DIM = 5
SPARE = DIM - 1  # text vectors put their remaining length here, so cos(image axis k, text) = score


def unit(k):
    v = torch.zeros(DIM)
    v[k] = 1.0
    return v


class FakeModel:
    """Image with pixel value k (0..3) embeds to 2 * e_k; a text embeds to 3 * (s e_k + sqrt(1-s^2) e_spare)."""

    def __init__(self, text_vectors):
        self.text_vectors = text_vectors
        self.text_batches, self.image_batches = [], []

    def encode_text(self, texts):
        self.text_batches.append(list(texts))
        return torch.stack([3 * self.text_vectors[t] for t in texts])

    def encode_image(self, images):
        self.image_batches.append(len(images))
        axes = (images[:, 0, 0, 0] * 255).round().long()
        return torch.stack([2 * unit(int(k)) for k in axes])

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def text_vector(score, axis=0):
    return score * unit(axis) + math.sqrt(1 - score ** 2) * unit(SPARE)


# -- polarity toy: scores chosen so every number below can be checked by hand ---------------

VECTORS = [{"a": 1, "b": 0, "c": 0}, {"a": 0, "b": 1, "c": 0}, {"a": 0, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 0}]
TOY = [  # findings, pattern of the answer, answer, negated scores, affirmative scores
    (["Edema", "Cardiomegaly", "Fracture"], "no", 0, [0.9, 0.1, 0.2, 0.3], [0.8, 0.1, 0.2, 0.3]),  # right, right
    (["Edema", "Pneumothorax", "Fracture"], "without", 1, [0.5, 0.4, 0.1, 0.1], [0.1, 0.8, 0.2, 0.3]),  # wrong, right
    (["Edema", "Cardiomegaly", "Pneumothorax"], "no", 2, [0.2, 0.2, 0.2, 0.2], [0.1, 0.2, 0.7, 0.7]),  # ties: wrong
    (["Cardiomegaly", "Pneumothorax", "Fracture"], "but_not", 3, [0.1, 0.2, 0.3, 0.6], [0.0, 0.2, 0.3, 0.5]),  # right
]


def toy_polarity():
    items, vectors = [], {}
    for i, (findings, pattern, answer, neg, aff) in enumerate(TOY):
        names = dict(zip("abc", findings, strict=True))
        negated = [f"item {i} negated option {k}" for k in range(4)]
        affirmative = [f"item {i} affirmative option {k}" for k in range(4)]
        vectors.update({t: text_vector(s) for t, s in zip(negated + affirmative, neg + aff, strict=True)})
        items.append(PolarityItem(
            item_id=f"toy/{i}", study_id=f"study{i}", question="?", options_negated=negated,
            options_affirmative=affirmative, option_labels=[{names[k]: v for k, v in vec.items()} for vec in VECTORS],
            answer=answer, findings=findings, option_patterns=[pattern] * 4, image_path=f"images/study{i}.png"))
    return items, vectors


def check_toy_result(result):
    assert result["n_items"] == 4
    assert result["accuracy_negated"]["value"] == pytest.approx(2 / 4)
    assert result["accuracy_affirmative"]["value"] == pytest.approx(3 / 4)
    assert result["gap"]["value"] == pytest.approx(1 / 4)
    expected_findings = {"Edema": (1 / 3, 2 / 3), "Cardiomegaly": (2 / 3, 2 / 3), "Pneumothorax": (1 / 3, 2 / 3),
                         "Fracture": (2 / 3, 1.0)}
    assert set(result["per_finding"]) == set(expected_findings)
    for finding, (neg, aff) in expected_findings.items():
        got = result["per_finding"][finding]
        assert got["accuracy_negated"]["value"] == pytest.approx(neg)
        assert got["accuracy_affirmative"]["value"] == pytest.approx(aff)
        assert got["gap"]["value"] == pytest.approx(aff - neg)
        assert got["gap"]["n"] == 3
    expected_patterns = {"no": (0.5, 0.5, 2), "without": (0.0, 1.0, 1), "but_not": (1.0, 1.0, 1)}
    for pattern, (neg, aff, n) in expected_patterns.items():
        got = result["per_pattern"][pattern]
        assert (got["accuracy_negated"]["value"], got["accuracy_affirmative"]["value"], got["gap"]["n"]) == \
            pytest.approx((neg, aff, n))
    for key in ("accuracy_negated", "accuracy_affirmative", "gap"):
        low, high = result[key]["ci"]
        assert low <= result[key]["value"] <= high


def test_polarity_toy_with_precomputed_image_embeddings():
    items, vectors = toy_polarity()
    model = FakeModel(vectors)
    embeddings = {f"study{i}": 2 * unit(0) for i in range(4)}
    result = evaluate_polarity(model, items, image_embeddings=embeddings, text_batch_size=3, progress=False)
    check_toy_result(result)
    encoded = [t for batch in model.text_batches for t in batch]
    assert sorted(encoded) == sorted(vectors) and max(map(len, model.text_batches)) == 3  # each text once, batched
    assert model.image_batches == []


def test_polarity_toy_from_image_files(tmp_path):
    items, vectors = toy_polarity()
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=0).save(tmp_path / "images" / f"study{i}.png")
    model = FakeModel(vectors)
    result = evaluate_polarity(model, items, image_root=tmp_path, image_batch_size=3, progress=False)
    check_toy_result(result)
    assert model.image_batches == [3, 1]


def test_missing_images_are_all_reported(tmp_path):
    items, vectors = toy_polarity()
    (tmp_path / "images").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "images" / "study0.png")
    with pytest.raises(FileNotFoundError, match=r"3 of 4 studies have no image under .*study1"):
        evaluate_polarity(FakeModel(vectors), items, image_root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="pass image_root"):
        evaluate_polarity(FakeModel(vectors), items, progress=False)


def test_strict_correctness():
    scores = np.array([[0.3, 0.3, 0.1, 0.0], [0.1, 0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert polarity_correct(scores, np.array([0, 1, 2])).tolist() == [False, True, False]


def test_bootstrap_matches_a_plain_loop():
    values = np.random.default_rng(1).integers(0, 2, size=(57, 2)).astype(float)
    low, high = bootstrap_ci(values, n_boot=300, seed=5)
    rng = np.random.default_rng(5)
    stats = np.array([values[rng.integers(0, 57, size=57)].mean(axis=0) for _ in range(300)])
    np.testing.assert_allclose(low, np.percentile(stats, 2.5, axis=0))
    np.testing.assert_allclose(high, np.percentile(stats, 97.5, axis=0))
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    weighted_low, weighted_high = bootstrap_ci(np.array([1.0, 0.0]), weights=np.array([3.0, 1.0]), n_boot=2000)
    assert 0 <= weighted_low < 0.75 < weighted_high <= 1


# -- contextual toy ------------------------------------------------------------------------

def claim(study, finding, text, holds, scope="none", present=True, **attrs):
    return ContextualClaim(finding=finding, present=present, text=text, negation_scope=scope, holds=holds,
                           study_id=study, **attrs)


def toy_contextual():
    """Item A: target 0.5 vs variants 0.6 / 0.4 and another finding at 0.3 -> rank 2, wins 1 of 2.
    Item B: target 0.9 vs variants 0.9 (tie) / 0.1 and four higher others -> rank 6, wins 1 of 2.
    Item C: target 0.7 vs one variant 0.1 -> rank 1, wins 1 of 1."""
    spec = {
        "A": [("Pleural Effusion", "A target", True, 0.5, {}),
              ("Pleural Effusion", "A no left", False, 0.6, {"scope": "location", "present": False, "side": "left"}),
              ("Pleural Effusion", "A not small", False, 0.4, {"scope": "severity", "severity": "small"}),
              ("Pneumothorax", "A other", False, 0.3, {})],
        "B": [("Edema", "B target", True, 0.9, {}),
              ("Edema", "B no edema", False, 0.9, {"scope": "finding", "present": False}),
              ("Edema", "B severe", False, 0.1, {"severity": "severe"})]
             + [("Fracture", f"B other {k}", False, s, {}) for k, s in enumerate([0.95, 0.93, 0.92, 0.91, 0.2])],
        "C": [("Cardiomegaly", "C target", True, 0.7, {"scope": "finding", "present": False}),
              ("Cardiomegaly", "C cardiomegaly", False, 0.1, {})],
    }
    items, vectors = [], {}
    for axis, (study, rows) in enumerate(spec.items()):
        claims = []
        for finding, text, holds, score, attrs in rows:
            attrs = dict(attrs)
            claims.append(claim(study, finding, text, holds, attrs.pop("scope", "none"), attrs.pop("present", True),
                                **attrs))
            vectors[text] = text_vector(score, axis)
        items.append(ContextualItem(item_id=f"ctx/{study}", study_id=study, target=claims[0], distractors=claims[1:]))
    return items, vectors, {study: 2 * unit(axis) for axis, study in enumerate(spec)}


def test_contextual_toy():
    items, vectors, embeddings = toy_contextual()
    result = evaluate_contextual(FakeModel(vectors), items, image_embeddings=embeddings, progress=False)
    assert result["retrieval"]["recall@1"]["value"] == pytest.approx(1 / 3)
    assert result["retrieval"]["recall@5"]["value"] == pytest.approx(2 / 3)
    assert result["ranking"]["pair_accuracy"]["value"] == pytest.approx(3 / 5)
    assert result["ranking"]["pair_accuracy"]["n_pairs"] == 5
    assert result["ranking"]["item_accuracy"]["value"] == pytest.approx(1 / 3)
    assert result["mean_candidates"] == pytest.approx((4 + 8 + 2) / 3)
    by_variant = result["per_variant_kind"]
    assert by_variant["location/absent"]["pair_accuracy"]["value"] == 0.0
    assert by_variant["severity/present"]["pair_accuracy"]["value"] == 1.0
    assert by_variant["none/present"]["pair_accuracy"]["value"] == 1.0  # "B severe", "C cardiomegaly"
    assert by_variant["finding/absent"]["pair_accuracy"]["value"] == 0.0  # the tie
    assert result["per_target_kind"]["finding/absent"]["retrieval"]["recall@1"]["value"] == 1.0


def test_reports_are_written(tmp_path):
    items, vectors = toy_polarity()
    result = evaluate_polarity(FakeModel(vectors), items, image_embeddings={f"study{i}": unit(0) for i in range(4)},
                               n_boot=50, progress=False)
    fig = polarity_figure(result)
    assert [trace.name for trace in fig.data] == ["negated wording", "affirmative wording"]
    result["per_finding"]["Edema"]["gap"]["ci"][0] = float("nan")
    paths = save_results(result, tmp_path / "out", fig)
    saved = json.loads(paths["results"].read_text())  # strict JSON: NaN became null
    assert saved["per_finding"]["Edema"]["gap"]["ci"][0] is None
    assert saved["gap"]["value"] == pytest.approx(0.25)
    assert paths["figure"].stat().st_size > 1000
    items, vectors, embeddings = toy_contextual()
    ctx = evaluate_contextual(FakeModel(vectors), items, image_embeddings=embeddings, n_boot=50, progress=False)
    assert len(contextual_figure(ctx).data[0].x) == 4 + len(ctx["per_variant_kind"])


# -- images --------------------------------------------------------------------------------

def test_image_resolver_layouts(tmp_path):
    chexpert = tmp_path / "CheXpert-v1.0-small" / "train" / "patient1" / "study1"
    chexpert.mkdir(parents=True)
    Image.new("L", (4, 4)).save(chexpert / "view1_frontal.jpg")
    rel = "CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg"
    assert ImageResolver(tmp_path)(rel, "patient1/study1") == chexpert / "view1_frontal.jpg"
    assert ImageResolver(tmp_path / "CheXpert-v1.0-small")(rel, "patient1/study1") == chexpert / "view1_frontal.jpg"
    mimic = tmp_path / "mimic" / "files" / "p10" / "p10000032" / "s50414267"
    mimic.mkdir(parents=True)
    for name in ("b.jpg", "a.jpg", "notes.txt"):
        (mimic / name).write_bytes(b"")
    assert ImageResolver(tmp_path / "mimic")(None, "50414267", "10000032") == mimic / "a.jpg"
    with pytest.raises(FileNotFoundError, match="no image for study '1'"):
        ImageResolver(tmp_path / "mimic")(None, "1", "10000032")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageResolver(tmp_path / "nowhere")


def test_load_image(tmp_path):
    Image.new("L", (4, 3), color=7).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    assert image.mode == "RGB" and image.size == (4, 3)
    if importlib.util.find_spec("pydicom") is None:
        (tmp_path / "x.dcm").write_bytes(b"")
        with pytest.raises(ImportError, match="install pydicom"):
            load_image(tmp_path / "x.dcm")


@pytest.mark.slow
def test_real_model_on_phantom_images(tmp_path, tiny_clip):
    """End to end: phantom PNGs + attributes -> contextual items -> a HookedVLM (random tiny weights)."""
    phantom = pytest.importorskip("negtrace.data.phantom")
    phantom.build_phantom_dataset(tmp_path, n_train=5, n_val=0, n_test=0, size=32, seed=1, progress=False)
    items = build_contextual(read_labels(tmp_path / "labels_train.csv"), read_attributes(tmp_path / "attributes_train.jsonl"),
                             attributes_complete=True, n_items=20).items
    result = evaluate_contextual(tiny_clip, items, image_root=tmp_path, n_boot=100, progress=False)
    assert result["n_items"] == 20
    for entry in (*result["retrieval"].values(), result["ranking"]["pair_accuracy"]):
        assert 0 <= entry["ci"][0] <= entry["value"] <= entry["ci"][1] <= 1
