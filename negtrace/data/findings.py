"""The CheXpert label vocabulary (Irvin et al., AAAI 2019), shared by every data module.

Column names are spelled exactly as in CheXpert's ``train.csv`` and MIMIC-CXR's
``mimic-cxr-2.0.0-chexpert.csv``. ``FINDINGS`` are the 13 findings the benchmarks use
("No Finding" is a summary label, not a finding, and is kept apart).
"""

from __future__ import annotations

NO_FINDING = "No Finding"

FINDINGS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

LABEL_COLUMNS: tuple[str, ...] = (NO_FINDING, *FINDINGS)

# CheXpert label values.
PRESENT, ABSENT, UNCERTAIN = 1, 0, -1


def check_finding(name: str) -> str:
    """Return ``name`` if it is one of the 13 findings, else raise listing the valid ones."""
    if name not in FINDINGS:
        raise ValueError(f"unknown finding {name!r}; valid findings are: {', '.join(FINDINGS)}")
    return name
