"""Tests of the chest-radiograph phantom generator (negtrace.data.phantom)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from negtrace.data import phantom as P
from negtrace.data.findings import FINDINGS, LABEL_COLUMNS, NO_FINDING

SIZE = 96

# One spec with every finding at once: pairs must stay exact however crowded the image is.
EVERYTHING = P.PhantomSpec.build({
    "Enlarged Cardiomediastinum": {"width_mm": 100.0},
    "Cardiomegaly": {"ctr": 0.62},
    "Lung Opacity": {"side": "right", "zone": "upper", "size": "small"},
    "Lung Lesion": {"side": "left", "zone": "upper", "diameter_mm": 20.0},
    "Edema": {"severity": "mild"},
    "Consolidation": {"side": "left", "zone": "lower", "size": "moderate"},
    "Pneumonia": {"side": "left", "zone": "middle", "size": "small"},
    "Atelectasis": {"side": "right", "zone": "lower"},
    "Pneumothorax": {"side": "right", "size": "moderate"},
    "Pleural Effusion": {"side": "bilateral", "size": "moderate"},
    "Pleural Other": {"side": "right"},
    "Fracture": {"side": "left", "rib": 6},
    "Support Devices": {"devices": ["endotracheal_tube", "central_line", "pacemaker", "enteric_tube"]},
})


def one(name: str, **attrs) -> P.PhantomSpec:
    return P.PhantomSpec.build({name: attrs})


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        m = out.copy()
        out[1:] |= m[:-1]
        out[:-1] |= m[1:]
        out[:, 1:] |= m[:, :-1]
        out[:, :-1] |= m[:, 1:]
    return out


def image_half(size: int, patient_side: str) -> np.ndarray:
    """Columns of the patient's side: on a PA film the patient's right is the image's left."""
    cols = np.arange(size) < size // 2
    return np.broadcast_to(cols if patient_side == "right" else ~cols, (size, size))


def centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


# -- determinism ------------------------------------------------------------------------

def test_same_seed_is_bit_identical_and_seeds_differ():
    spec = P.sample_specs(1, seed=5)[0]
    a = P.render(spec, size=SIZE, seed=11)
    P._base_layers.cache_clear()
    b = P.render(spec, size=SIZE, seed=11)
    c = P.render(spec, size=SIZE, seed=12)
    assert a.dtype == np.float32 and a.shape == (SIZE, SIZE)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_batch_render_uses_per_image_seeds():
    specs = P.sample_specs(3, seed=1)
    batch = P.render(specs, size=64, seed=4)
    assert batch.shape == (3, 64, 64)
    for i, spec in enumerate(specs):
        assert np.array_equal(batch[i], P.render(spec, size=64, seed=(4, i)))


def test_image_looks_like_a_radiograph():
    img = P.render(P.PhantomSpec(), size=SIZE, seed=2)
    m = P.anatomy_masks(P.PhantomSpec(), size=SIZE, seed=2)
    lungs = (m["lung_left"] > 0.9) | (m["lung_right"] > 0.9)
    heart = m["heart"] > 0.9
    corner = img[:6, :6]
    assert img[heart].mean() > img[lungs].mean() + 0.3  # dense heart bright, aerated lung dark
    assert corner.mean() < 0.15  # air outside the body is black
    assert lungs.mean() > 0.15


# -- sampling from the real statistics --------------------------------------------------

def test_maxent_model_reproduces_chexpert_statistics():
    stats = P.load_chexpert_stats()
    probs = P.finding_model().probs()
    states = P._state_matrix(len(FINDINGS))
    co = (states * probs[:, None]).T @ states
    np.testing.assert_allclose(co, np.array(stats["cooccurrence"]), atol=1e-6)
    np.testing.assert_allclose(np.diag(co), [stats["prevalence"][f] for f in FINDINGS], atol=1e-6)


def test_sample_specs_follow_prevalence_and_cooccurrence():
    stats = P.load_chexpert_stats()
    specs = P.sample_specs(3000, seed=0)
    present = np.array([[s.has(f) for f in FINDINGS] for s in specs], dtype=float)
    expected = np.array([stats["prevalence"][f] for f in FINDINGS])
    se = np.sqrt(expected * (1 - expected) / len(specs))
    assert np.all(np.abs(present.mean(0) - expected) < 4.5 * se + 1e-3)
    co = (present.T @ present) / len(specs)

    def lift(a: str, b: str) -> float:
        i, j = FINDINGS.index(a), FINDINGS.index(b)
        return co[i, j] / (expected[i] * expected[j])

    # Real associations, not independent draws: edema goes with cardiomegaly, not pneumothorax.
    assert lift("Cardiomegaly", "Edema") > 1.4
    assert lift("Edema", "Pneumothorax") < 0.6


def test_sample_specs_deterministic_prefix_stable_and_overridable():
    a = P.sample_specs(20, seed=3)
    assert a == P.sample_specs(20, seed=3)
    assert a[:7] == P.sample_specs(7, seed=3)
    assert a != P.sample_specs(20, seed=4)
    boosted = P.sample_specs(800, seed=3, prevalence={"Pneumothorax": 0.5})
    assert 0.44 < np.mean([s.has("Pneumothorax") for s in boosted]) < 0.56
    with pytest.raises(ValueError, match="prevalence"):
        P.sample_specs(2, seed=0, prevalence={"Pneumothorax": 1.5})


# -- findings in pixels -----------------------------------------------------------------

@pytest.mark.parametrize("name", FINDINGS)
def test_pair_differs_only_inside_the_finding_region(name):
    with_f, without = P.render_pair(EVERYTHING, name, size=SIZE, seed=3)
    region = P.finding_region(EVERYTHING, name, size=SIZE, seed=3)
    changed = with_f != without
    assert changed.any()
    assert not (changed & ~dilate(region)).any()


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_brightens_its_costophrenic_angle_more_with_size(side):
    other = "left" if side == "right" else "right"
    masks = P.anatomy_masks(P.PhantomSpec(), size=SIZE, seed=8)
    angle, lung = masks[f"costophrenic_{side}"] > 0.5, masks[f"lung_{side}"] > 0.5
    opposite = (masks[f"lung_{other}"] > 0) | (masks[f"costophrenic_{other}"] > 0)
    gains = []
    for size in ("small", "moderate", "large"):
        with_f, without = P.render_pair(one("Pleural Effusion", side=side, size=size), "Pleural Effusion",
                                        size=SIZE, seed=8)
        diff = with_f - without
        assert diff[angle].mean() > 0.05  # even a small effusion blunts the costophrenic angle
        gains.append(float(diff[lung].mean()))
        assert np.array_equal(with_f[opposite], without[opposite])
    assert 0 < gains[0] < gains[1] < gains[2]


def test_larger_effusions_reach_higher():
    tops = []
    for size in ("small", "moderate", "large"):
        with_f, without = P.render_pair(one("Pleural Effusion", side="right", size=size), "Pleural Effusion",
                                        size=SIZE, seed=1)
        rows = np.nonzero((with_f - without > 0.05).any(axis=1))[0]
        tops.append(rows.min())
    assert tops[0] > tops[1] > tops[2]


def ctr_from_masks(masks: dict[str, np.ndarray]) -> float:
    heart = masks["heart"] > 0.5
    lungs = (masks["lung_left"] > 0.5) | (masks["lung_right"] > 0.5)
    cols = np.arange(heart.shape[1])
    thorax = max(cols[row].max() - cols[row].min() + 1 for row in lungs if row.any())
    return heart.sum(axis=1).max() / thorax


@pytest.mark.parametrize("ctr", [0.40, 0.47, 0.58, 0.70])
def test_cardiothoracic_ratio_matches_spec(ctr):
    spec = (one("Cardiomegaly", ctr=ctr) if ctr > P.CTR_THRESHOLD else P.PhantomSpec(heart_ctr=ctr))
    masks = P.anatomy_masks(spec, size=SIZE, seed=4)
    assert ctr_from_masks(masks) == pytest.approx(ctr, abs=0.025)
    # The rendered pixels show the same heart: a bright run across the widest heart row.
    image = P.render(spec, size=SIZE, seed=4)
    row = int(np.argmax((masks["heart"] > 0.5).sum(axis=1)))
    profile = image[row - 1:row + 2].mean(axis=0)
    heart_cols = np.nonzero(masks["heart"][row] > 0.5)[0]
    lung = (masks["lung_left"][row] > 0.5) | (masks["lung_right"][row] > 0.5)
    threshold = 0.5 * (np.median(profile[heart_cols]) + np.median(profile[lung]))
    centre = int(heart_cols.mean())
    left = right = centre
    while left > 0 and profile[left - 1] > threshold:
        left -= 1
    while right < SIZE - 1 and profile[right + 1] > threshold:
        right += 1
    assert abs((right - left + 1) - len(heart_cols)) <= 3


def _box(img: np.ndarray, r: int) -> np.ndarray:
    shifted = (np.roll(np.roll(img, dy, 0), dx, 1) for dy in range(-r, r + 1) for dx in range(-r, r + 1))
    return sum(shifted) / (2 * r + 1) ** 2


def _detail(img: np.ndarray) -> np.ndarray:
    """Band-pass: vessel-sized structure, without pixel noise or the smooth background."""
    return _box(img, 1) - _box(img, 4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pneumothorax_removes_lung_markings_on_its_side(side):
    spec = one("Pneumothorax", side=side, size="large")
    seen_without, seen_with = [], []
    for seed in range(3):
        with_f, without = P.render_pair(spec, "Pneumothorax", size=224, seed=seed)
        region = P.finding_region(spec, "Pneumothorax", size=224, seed=seed)
        inner = region & ~dilate(~region, 5)  # away from the pleural line and the chest wall
        assert with_f[inner].mean() < without[inner].mean()  # free air is more lucent
        assert (region & image_half(224, side)).sum() == region.sum()
        # How strongly this patient's own vessel pattern shows through, with and without.
        pattern = _detail(P._base_layers((seed,), 224, P.PhantomSpec())[3])[inner]
        seen_without.append(float(np.corrcoef(_detail(without)[inner], pattern)[0, 1]))
        seen_with.append(float(np.corrcoef(_detail(with_f)[inner], pattern)[0, 1]))
    assert np.mean(seen_without) > 0.3 and np.mean(seen_with) < 0.12
    assert min(np.subtract(seen_without, seen_with)) > 0.2


@pytest.mark.parametrize("side,zone", [("left", "upper"), ("right", "lower")])
def test_nodule_raises_intensity_at_its_location(side, zone):
    spec = one("Lung Lesion", side=side, zone=zone, diameter_mm=25.0)
    with_f, without = P.render_pair(spec, "Lung Lesion", size=SIZE, seed=2)
    region = P.finding_region(spec, "Lung Lesion", size=SIZE, seed=2)
    assert (with_f - without)[region].mean() > 0.05
    assert (region & image_half(SIZE, side)).sum() == region.sum()
    masks = P.anatomy_masks(spec, size=SIZE, seed=2)
    lung_rows = np.nonzero((masks[f"lung_{side}"] > 0.5).any(axis=1))[0]
    third = (centroid(region)[0] - lung_rows.min()) / (lung_rows.max() - lung_rows.min())
    assert (third < 0.4) if zone == "upper" else (third > 0.55)
    small = P.finding_region(one("Lung Lesion", side=side, zone=zone, diameter_mm=8.0), "Lung Lesion",
                             size=SIZE, seed=2)
    assert small.sum() < region.sum()


@pytest.mark.parametrize("name", ["Consolidation", "Lung Opacity", "Pneumonia"])
def test_airspace_opacity_side_zone_and_extent(name):
    spec = one(name, side="right", zone="lower", size="large")
    with_f, without = P.render_pair(spec, name, size=SIZE, seed=9)
    region = P.finding_region(spec, name, size=SIZE, seed=9)
    assert (with_f - without)[region].mean() > 0.03
    assert (region & image_half(SIZE, "right")).sum() == region.sum()
    small = P.finding_region(one(name, side="right", zone="lower", size="small"), name, size=SIZE, seed=9)
    assert small.sum() < region.sum()
    upper = P.finding_region(one(name, side="right", zone="upper", size="large"), name, size=SIZE, seed=9)
    assert centroid(upper)[0] < centroid(region)[0]


def test_bilateral_findings_cover_both_lungs_and_edema_grows_with_severity():
    gains = []
    for severity in ("mild", "moderate", "severe"):
        spec = one("Edema", severity=severity)
        with_f, without = P.render_pair(spec, "Edema", size=SIZE, seed=5)
        region = P.finding_region(spec, "Edema", size=SIZE, seed=5)
        assert (region & image_half(SIZE, "left")).any() and (region & image_half(SIZE, "right")).any()
        gains.append(float((with_f - without).mean()))
    assert 0 < gains[0] < gains[1] < gains[2]
    effusion = P.finding_region(one("Pleural Effusion", side="bilateral", size="small"), "Pleural Effusion",
                                size=SIZE, seed=5)
    assert (effusion & image_half(SIZE, "left")).any() and (effusion & image_half(SIZE, "right")).any()


@pytest.mark.parametrize("name,attrs", [
    ("Atelectasis", {"side": "left", "zone": "lower"}),
    ("Fracture", {"side": "right", "rib": 7}),
    ("Pleural Other", {"side": "left"}),
])
def test_sided_findings_stay_on_their_side(name, attrs):
    spec = one(name, **attrs)
    with_f, without = P.render_pair(spec, name, size=SIZE, seed=7)
    changed = with_f != without
    assert changed.any()
    assert not (changed & ~image_half(SIZE, attrs["side"])).any()


def test_fracture_is_a_small_local_change():
    spec = one("Fracture", side="left", rib=5)
    region = P.finding_region(spec, "Fracture", size=224, seed=1)
    rows, cols = np.nonzero(region)
    assert np.ptp(rows) < 25 and np.ptp(cols) < 40


def test_support_devices_are_dense_and_where_expected():
    spec = one("Support Devices", devices=["pacemaker"])
    with_f, without = P.render_pair(spec, "Support Devices", size=SIZE, seed=0)
    region = P.finding_region(spec, "Support Devices", size=SIZE, seed=0)
    assert with_f[region].max() > 0.95  # a metal generator is nearly white
    assert centroid(region)[1] > SIZE / 2  # left-sided pacemaker: image right
    tube = P.finding_region(one("Support Devices", devices=["endotracheal_tube"]), "Support Devices",
                            size=SIZE, seed=0)
    assert abs(centroid(tube)[1] - SIZE / 2) < SIZE * 0.05 and centroid(tube)[0] < SIZE / 2


def test_widened_mediastinum_is_wider():
    normal = P.anatomy_masks(P.PhantomSpec(), size=SIZE, seed=3)["mediastinum"] > 0.5
    wide = P.anatomy_masks(one("Enlarged Cardiomediastinum", width_mm=120.0), size=SIZE, seed=3)["mediastinum"] > 0.5
    assert wide.sum(axis=1).max() > 1.4 * normal.sum(axis=1).max()


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: P.Finding("Pneumothroax", side="left", size="small"), "valid findings are: Enlarged"),
    (lambda: P.Finding("Cardiomegaly", ctr=0.4), "CTR > 0.5"),
    (lambda: P.Finding("Pleural Effusion", side="middle", size="small"), "side must be one of left, right"),
    (lambda: P.Finding("Pleural Effusion", side="left", size="huge"), "size must be one of small"),
    (lambda: P.Finding("Pneumothorax", size="small"), "requires 'side'"),
    (lambda: P.Finding("Edema", severity="mild", side="left"), "Edema takes no 'side'"),
    (lambda: P.Finding("Lung Lesion", side="bilateral", zone="upper", diameter_mm=10.0), "side must be one of"),
    (lambda: P.Finding("Support Devices", devices=["stent"]), "devices must list"),
    (lambda: P.Finding("Enlarged Cardiomediastinum", width_mm=60.0), "widened"),
    (lambda: P.PhantomSpec(heart_ctr=0.6), "Cardiomegaly finding"),
    (lambda: P.PhantomSpec(findings=(P.Finding("Edema", severity="mild"), P.Finding("Edema", severity="severe"))),
     "listed twice"),
])
def test_impossible_specs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_render_arguments():
    with pytest.raises(ValueError, match="no 'Edema' to remove"):
        P.render_pair(P.PhantomSpec(), "Edema", size=64)
    with pytest.raises(ValueError, match="valid findings"):
        P.render_pair(EVERYTHING, "Pneumonitis", size=64)
    with pytest.raises(ValueError, match="seed"):
        P.render(P.PhantomSpec(), size=64, seed=-1)
    with pytest.raises(ValueError, match="size"):
        P.render(P.PhantomSpec(), size=8)


def test_spec_round_trips_through_json():
    for spec in [EVERYTHING, *P.sample_specs(5, seed=2)]:
        assert P.PhantomSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# -- labels -----------------------------------------------------------------------------

def test_label_rows_use_chexpert_columns_and_values():
    spec = one("Pleural Effusion", side="left", size="small")
    row = P.label_row("train/p1.png", spec, mentioned_absent=("Pneumothorax",))
    assert tuple(row) == P.CHEXPERT_COLUMNS
    assert P.CHEXPERT_COLUMNS[:5] == ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
    assert P.CHEXPERT_COLUMNS[5:] == LABEL_COLUMNS
    assert row["Pleural Effusion"] == "1.0" and row["Pneumothorax"] == "0.0" and row["Edema"] == ""
    assert row[NO_FINDING] == ""
    assert set(row[c] for c in LABEL_COLUMNS) <= {"1.0", "0.0", ""}


def test_no_finding_ignores_support_devices():
    assert P.chexpert_labels(P.PhantomSpec())[NO_FINDING] == 1.0
    devices_only = one("Support Devices", devices=["central_line"])
    labels = P.chexpert_labels(devices_only, ("Pneumothorax",))
    assert labels[NO_FINDING] == 1.0 and labels["Support Devices"] == 1.0 and labels["Pneumothorax"] == 0.0
    assert P.chexpert_labels(one("Edema", severity="mild"))[NO_FINDING] is None
    with pytest.raises(ValueError, match="cannot negate"):
        P.chexpert_labels(one("Edema", severity="mild"), ("Edema",))


# -- dataset ----------------------------------------------------------------------------

def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_dataset_writes_resumes_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = P.build_phantom_dataset(a, 3, 2, 1, size=64, seed=5, progress=False)
    assert (first.rendered, first.skipped) == (6, 0)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        with open(a / f"labels_{split}.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        assert tuple(reader.fieldnames) == P.CHEXPERT_COLUMNS and len(rows) == n
        attrs = [json.loads(line) for line in (a / f"attributes_{split}.jsonl").read_text().splitlines()]
        reports = [json.loads(line) for line in (a / f"reports_{split}.jsonl").read_text().splitlines()]
        for row, attr, report in zip(rows, attrs, reports, strict=True):
            assert (a / row["Path"]).is_file() and attr["path"] == report["path"] == row["Path"]
            spec = P.PhantomSpec.from_dict(attr["spec"])
            assert row == P.label_row(row["Path"], spec, report["mentioned_absent"])
            assert report["findings"] and report["impression"]
    stamps = {p: os.stat(p).st_mtime_ns for p in a.rglob("*.png")}
    again = P.build_phantom_dataset(a, 3, 2, 1, size=64, seed=5, progress=False)
    assert (again.rendered, again.skipped) == (0, 6)
    assert stamps == {p: os.stat(p).st_mtime_ns for p in a.rglob("*.png")}
    next(iter(a.rglob("*.png"))).unlink()
    assert P.build_phantom_dataset(a, 3, 2, 1, size=64, seed=5, progress=False).rendered == 1
    P.build_phantom_dataset(b, 3, 2, 1, size=64, seed=5, progress=False)
    assert _tree(a) == _tree(b)
    assert not list(a.rglob("*.tmp"))
    other = P.build_phantom_dataset(tmp_path / "c", 3, 2, 1, size=64, seed=6, progress=False)
    assert other.rendered == 6 and _tree(tmp_path / "c") != _tree(a)
