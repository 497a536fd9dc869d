"""Dataset tracing sharded over ranks: two torchrun processes against one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from negtrace.patching.distributed import patch_dataset, shard_indices
from negtrace.patching.engine import patch
from negtrace.patching.result import CTEResult
from negtrace.trace_job import TraceRecord, read_records, run_trace

TEXTS = ["there is no pleural effusion.", "no pneumothorax is seen.", "the heart is not enlarged.",
         "there is no focal consolidation.", "lungs are clear without consolidation.", "there is no rib fracture."]
RECORDS = [TraceRecord(t) for t in TEXTS]
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def test_shards_cover_every_record_exactly_once():
    for world in (1, 2, 3, 4):
        shards = [shard_indices(range(10), r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(10))
        assert all(s == list(range(r, 10, world)) for r, s in enumerate(shards))
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        shard_indices(range(4), 2, 2)


def test_patch_dataset_without_process_group_equals_patch(tiny_clip):
    one_by_one = [patch(tiny_clip, t) for t in TEXTS[:4]]
    exact = patch_dataset(tiny_clip, RECORDS[:4], batch_size=1, progress=False)
    batched = patch_dataset(tiny_clip, RECORDS[:4], batch_size=3, progress=False)
    for a, b, c in zip(one_by_one, exact, batched, strict=True):
        assert a.text == b.text == c.text
        assert torch.equal(a.values.nan_to_num(9.0), b.values.nan_to_num(9.0))
        assert torch.allclose(a.values, c.values, atol=1e-4, equal_nan=True)
    with pytest.raises(IndexError, match=r"record indices \[7\] are out of range for 4 records"):
        patch_dataset(tiny_clip, RECORDS[:4], indices=[0, 7])


def test_noise_draws_follow_the_record_index_not_the_batch(tiny_clip):
    kw = dict(corrupt="noise", samples=2, seed=5, progress=False)
    full = patch_dataset(tiny_clip, RECORDS[:4], batch_size=4, **kw)
    part = patch_dataset(tiny_clip, RECORDS[:4], indices=[3, 1], batch_size=1, **kw)
    for got, i in zip(part, [3, 1], strict=True):  # record i uses seed 5 + i wherever it is traced
        assert torch.allclose(got.values, full[i].values, atol=1e-4, equal_nan=True)
    alone = patch(tiny_clip, TEXTS[1], corrupt="noise", samples=2, seed=6)
    assert torch.allclose(alone.values, full[1].values, atol=1e-4, equal_nan=True)


def _open_clip_folder(hooked, folder):
    """An open_clip ``local-dir:`` folder holding the tiny fixture model (so each rank loads it in a second)."""
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = {"embed_dim": 32, "vision_cfg": {"layers": 3, "width": 64, "head_width": 16, "patch_size": 8, "image_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in hooked.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_clip):
    from negtrace.models.zoo import load

    spec = _open_clip_folder(tiny_clip, tmp_path / "model")
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"clean": t}) for t in TEXTS) + "\n")
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "negtrace.cli", "trace",
                           "--model", spec, "--input", str(src), "--out", str(out), "--sites", "resid", "mlp",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("examples: 6") == 1  # only rank 0 reports
    assert sorted(p.name for p in (out / "examples").glob("*.json")) == [f"{i:05d}.json" for i in range(6)]

    model, threads = load(spec, device="cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' setting: same kernels, same rounding
    try:
        single = run_trace(model, read_records(src), tmp_path / "single", {"sites": ["resid", "mlp"]}, tmp_path,
                           sites=("resid", "mlp"), progress=False)
    finally:
        torch.set_num_threads(threads)
    ranks = CTEResult.load(out / "cte")
    assert torch.equal(ranks.n, single.n.float()) and ranks.labels == single.labels
    assert torch.allclose(ranks.values, single.values, atol=1e-6, equal_nan=True)
    assert torch.allclose(ranks.ci_low, single.ci_low, atol=1e-6, equal_nan=True)
    for i in range(6):  # per-example files are in the original order
        assert CTEResult.load(out / "examples" / f"{i:05d}").text == TEXTS[i]
