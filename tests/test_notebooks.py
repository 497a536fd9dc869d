"""Execute every ``notebooks/*.ipynb`` top to bottom with nbclient; any cell error fails.

Setup and run (from the repository root)::

    pip install -e ".[dev]"                      # nbclient, nbformat, ipykernel
    python -m pytest tests/test_notebooks.py

Each notebook runs in a fresh kernel with ``NEGTRACE_NB_SMALL=1`` (its parameters cell then
picks reduced sizes) and ``NEGTRACE_NB_OUT`` pointing into pytest's temporary folder, with a
per-cell timeout. The kernel is a kernelspec for this interpreter written into the temporary
folder (no ``ipykernel install`` needed), so the notebooks always run against the environment
the tests run in. Notebooks are stored without outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="notebook tests need the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # seconds per cell: generous, since CI machines may be shared; a healthy run needs seconds


def test_the_notebooks_are_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_where_is_negation.ipynb", "02_negation_benchmarks.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    assert "NEGTRACE_NB_SMALL" in code[0].source
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} carry outputs; clear them before committing"


def _kernel_name(tmp_path_factory) -> tuple[str, dict]:
    """A kernelspec that runs this very interpreter, and the environment that makes it visible.

    Written into a temporary Jupyter data folder, so the notebooks run against the
    environment the tests run in whatever ``python3`` kernelspec is installed (or none).
    """
    data_dir = tmp_path_factory.mktemp("jupyter")
    kdir = data_dir / "kernels" / "negtrace-test"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "negtrace tests", "language": "python"}))
    return "negtrace-test", {"JUPYTER_PATH": os.pathsep.join(filter(None, [str(data_dir), os.environ.get("JUPYTER_PATH")]))}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, tmp_path_factory, monkeypatch):
    kernel, extra_env = _kernel_name(tmp_path_factory)
    out = tmp_path / "out"
    for key, value in {"NEGTRACE_NB_SMALL": "1", "NEGTRACE_NB_OUT": str(out), "HF_HUB_OFFLINE": "1",
                       "OMP_NUM_THREADS": "2", **extra_env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    seconds = time.perf_counter() - started
    print(f"{path.name}: executed in {seconds:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert out.is_dir() and any(out.rglob("*")), "the notebook wrote nothing under NEGTRACE_NB_OUT"
