import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_clip():
    from negtrace.models.random_models import tiny_open_clip

    return tiny_open_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_biomedclip(tmp_path_factory):
    from negtrace.models.random_models import biomedclip_layout

    return biomedclip_layout(tmp_path_factory.mktemp("biomedclip"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory):
    from negtrace.models.random_models import hf_clip

    return hf_clip(tmp_path_factory.mktemp("hfclip"), seed=0)


@pytest.fixture(scope="session", params=["open_clip", "biomedclip", "hf_clip"])
def any_family(request):
    return request.getfixturevalue({"open_clip": "tiny_clip", "biomedclip": "tiny_biomedclip",
                                    "hf_clip": "tiny_hf_clip"}[request.param])


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
CHEXPERT_CELL = {1: "1.0", 0: "0.0", -1: "-1.0", None: ""}


def write_chexpert_csv(path, rows):
    """Write a CheXpert-layout label CSV. rows: (image path, view, AP/PA, {column: 1/0/-1})"""
    import csv

    from negtrace.data.findings import LABEL_COLUMNS

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CHEXPERT_HEADER, *LABEL_COLUMNS])
        for image, view, ap_pa, labels in rows:
            writer.writerow([image, "Male", "50", view, ap_pa] + [CHEXPERT_CELL[labels.get(c)] for c in LABEL_COLUMNS])
    return path


def random_images(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *model.image_size, generator=g)
