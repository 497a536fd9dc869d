import csv
import gzip
import itertools
import time
from pathlib import Path

import numpy as np
import pytest

from negtrace.data.findings import LABEL_COLUMNS
from negtrace.data.labels import BLANK, LabelFileError, read_labels

CHEXPERT_META = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
CELL = {1: "1.0", 0: "0.0", -1: "-1.0", None: ""}


def chexpert_row(path, view="Frontal", **labels):
    row = {"Path": path, "Sex": "Female", "Age": "60", "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""}
    row.update({c: CELL[labels.get(c.replace(" ", "_"))] for c in LABEL_COLUMNS})
    return row


def write_csv(path: Path, header, rows, opener=open):
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(h, "") for h in header] if isinstance(row, dict) else row)
    return path


def small_chexpert(tmp_path, name="train.csv", opener=open):
    rows = [
        chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", No_Finding=1, Support_Devices=1),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view1_lateral.jpg", "Lateral",
                     Cardiomegaly=-1, Edema=0, Pleural_Effusion=1),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view2_frontal.jpg", "Frontal",
                     Cardiomegaly=-1, Edema=0, Pleural_Effusion=1),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study1/view1_lateral.jpg", "Lateral", Fracture=1),
    ]
    return write_csv(tmp_path / name, CHEXPERT_META + list(LABEL_COLUMNS), rows, opener)


def test_chexpert_layout_groups_views_and_prefers_frontal(tmp_path):
    table = read_labels(small_chexpert(tmp_path))
    assert table.layout == "chexpert"
    assert table.n_rows == 4 and len(table) == 3
    assert table.study_ids == ["patient00001/study1", "patient00002/study2", "patient00002/study1"]
    assert table.subject_ids == ["patient00001", "patient00002", "patient00002"]
    assert table.image_paths[1].endswith("study2/view2_frontal.jpg")
    assert table.views == ["Frontal", "Frontal", "Lateral"]
    labels = table.labels(1)
    assert labels["Cardiomegaly"] == -1 and labels["Edema"] == 0 and labels["Pleural Effusion"] == 1
    assert labels["Pneumothorax"] is None
    assert table.values.dtype == np.int8 and table.values[0, 0] == 1 and table.values[0, 1] == BLANK
    assert table.findings.shape == (3, 13)


def test_gzip_reads_the_same(tmp_path):
    plain = read_labels(small_chexpert(tmp_path))
    packed = read_labels(small_chexpert(tmp_path, "train.csv.gz", gzip.open))
    assert packed.study_ids == plain.study_ids
    np.testing.assert_array_equal(packed.values, plain.values)


def test_mimic_layout(tmp_path):
    header = ["subject_id", "study_id", *LABEL_COLUMNS]
    rows = [["10000032", "50414267"] + [""] * 14, ["10000032", "53189527"] + ["1.0"] + [""] * 13]
    table = read_labels(write_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", header, rows))
    assert table.layout == "mimic"
    assert table.study_ids == ["50414267", "53189527"]
    assert table.subject_ids == ["10000032", "10000032"]
    assert table.image_paths == [None, None]
    assert table.labels(1)["No Finding"] == 1


def test_unusual_spellings_are_accepted(tmp_path):
    header = ["subject_id", "study_id", *LABEL_COLUMNS]
    rows = [["1", "2", "1.00", " 0", "-1", "1", " "] + [""] * 9]
    table = read_labels(write_csv(tmp_path / "labels.csv", header, rows))
    assert table.values[0, :5].tolist() == [1, 0, -1, 1, BLANK]


def test_missing_columns_are_all_listed(tmp_path):
    header = [c for c in CHEXPERT_META + list(LABEL_COLUMNS) if c not in ("Edema", "Fracture")]
    with pytest.raises(LabelFileError, match="missing label columns: Edema, Fracture"):
        read_labels(write_csv(tmp_path / "x.csv", header, []))


def test_missing_id_columns_name_both_layouts(tmp_path):
    header = ["study_id", *LABEL_COLUMNS[:-1]]
    with pytest.raises(LabelFileError) as err:
        read_labels(write_csv(tmp_path / "x.csv", header, []))
    message = str(err.value)
    assert "missing columns: subject_id, Support Devices" in message
    assert "'Path'" in message and "MIMIC-CXR" in message


@pytest.mark.parametrize("cell, problem", [("yes", "non-numeric"), ("2.0", "unexpected value")])
def test_bad_label_cells_name_line_and_column(tmp_path, cell, problem):
    rows = [chexpert_row(f"p/patient{k}/study1/view1_frontal.jpg", Edema=0) for k in range(3)]
    rows[1]["Edema"] = cell
    with pytest.raises(LabelFileError) as err:
        read_labels(write_csv(tmp_path / "x.csv", CHEXPERT_META + list(LABEL_COLUMNS), rows))
    assert f"line 3, column 'Edema': '{cell}' ({problem})" in str(err.value)
    assert "1 label cells" in str(err.value)


def test_duplicate_study_ids(tmp_path):
    header = ["subject_id", "study_id", *LABEL_COLUMNS]
    rows = [["1", "7"] + [""] * 14, ["1", "8"] + [""] * 14, ["2", "7"] + [""] * 14]
    with pytest.raises(LabelFileError, match=r"1 duplicate study_ids: '7' at lines 2 and 4"):
        read_labels(write_csv(tmp_path / "x.csv", header, rows))


def test_duplicate_image_paths(tmp_path):
    rows = [chexpert_row("p/patient1/study1/view1_frontal.jpg")] * 2
    with pytest.raises(LabelFileError, match="duplicate image paths"):
        read_labels(write_csv(tmp_path / "x.csv", CHEXPERT_META + list(LABEL_COLUMNS), rows))


def test_conflicting_views_of_one_study(tmp_path):
    rows = [chexpert_row("p/patient1/study1/view1_frontal.jpg", Edema=1),
            chexpert_row("p/patient1/study1/view2_lateral.jpg", "Lateral", Edema=0)]
    with pytest.raises(LabelFileError, match="disagree .* line 3 vs line 2"):
        read_labels(write_csv(tmp_path / "x.csv", CHEXPERT_META + list(LABEL_COLUMNS), rows))


def test_empty_ids_ragged_rows_and_empty_files(tmp_path):
    header = ["subject_id", "study_id", *LABEL_COLUMNS]
    with pytest.raises(LabelFileError, match="empty id .* lines 2"):
        read_labels(write_csv(tmp_path / "a.csv", header, [["1", ""] + [""] * 14]))
    with pytest.raises(LabelFileError, match="line 2: 3 fields"):
        read_labels(write_csv(tmp_path / "b.csv", header, [["1", "2", "1.0"]]))
    with pytest.raises(LabelFileError, match="no data rows"):
        read_labels(write_csv(tmp_path / "c.csv", header, []))
    (tmp_path / "d.csv").write_text("")
    with pytest.raises(LabelFileError, match="empty"):
        read_labels(tmp_path / "d.csv")
    with pytest.raises(LabelFileError, match="not found"):
        read_labels(tmp_path / "missing.csv")


def test_real_chexpert_file():
    xrv = pytest.importorskip("torchxrayvision")
    path = Path(xrv.__file__).parent / "data" / "chexpert_train.csv.gz"
    started = time.perf_counter()
    table = read_labels(path)
    seconds = time.perf_counter() - started
    assert table.n_rows == 223414 and len(table) == 187641
    assert seconds < 20, f"reading took {seconds:.1f}s"
    # The first 20k rows, re-read with the csv module alone, give the same studies and labels.
    with gzip.open(path, "rt", newline="") as f:
        rows = list(itertools.islice(csv.reader(f), 1, 20001))
    first = {}
    for row in rows:
        first.setdefault(row[0].rsplit("/", 1)[0].split("train/")[-1], row)
    head = list(first)[:-1]  # the last study may continue past row 20000
    index = table.index()
    code = {"1.0": 1, "0.0": 0, "-1.0": -1, "": BLANK}
    for study in head:
        assert table.values[index[study]].tolist() == [code[c] for c in first[study][5:]]
    assert table.study_ids[:len(head)] == head
