import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from negtrace.finetune import loop
from negtrace.finetune.data import Example, flip_negations, load_examples
from negtrace.finetune.loop import CheckpointMismatchError, load_finetuned, selective_finetune
from negtrace.models.random_models import tiny_open_clip

SCALES = {"text.blocks.1": 1.0, "text.blocks.2": 0.3}
REPO = Path(__file__).resolve().parents[1]

# Shared by the in-process reference runs and the subprocess runs: same data, same config.
CHILD = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    from negtrace.finetune.data import Example
    from negtrace.finetune.loop import selective_finetune
    from negtrace.models.random_models import tiny_open_clip

    def examples():
        g = torch.Generator().manual_seed(0)
        ex = [Example(torch.randn(3, 32, 32, generator=g), f"there is no effusion {i}", (f"there is a effusion {i}",),
                      key=str(i)) for i in range(12)]
        ex += [Example(torch.randn(3, 32, 32, generator=g), None, (), (f"no a {i}", "a b", "c d", "d e"), i % 4,
                       key=f"m{i}") for i in range(4)]
        return ex

    CONFIG = dict(lr=1e-3, batch_size=8, seed=3, progress=False, warmup_steps=1)

    def run(out, steps, slow=False, **extra):
        def cb(event, info):
            if slow and event == "checkpoint":
                time.sleep(60)  # the parent kills us here
        return selective_finetune(tiny_open_clip(0), {"text.blocks.1": 1.0, "text.blocks.2": 0.3}, examples(),
                                  out_dir=out, steps=steps, callbacks=[cb], **CONFIG, **extra)

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), slow=os.environ.get("SLOW") == "1", checkpoint_every=2)
""")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    path = tmp_path_factory.mktemp("child") / "child_run.py"
    path.write_text(CHILD)
    return path


def _reference(child, out, steps, **extra):
    """Uninterrupted run in this process, with the child's exact code and thread count."""
    ns: dict = {}
    exec(compile(child.read_text(), str(child), "exec"), ns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ns["run"](str(out), steps, **extra)
    finally:
        torch.set_num_threads(threads)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, child):
    """MUST SHOW (a): SIGKILL mid-run, resume, final weights == an uninterrupted run's."""
    ref = _reference(child, tmp_path / "ref", 5)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(child), str(out), "5"], env={**_env(), "SLOW": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: CI machines can be heavily shared
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 600 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-00000002"
    assert not (out / "model.safetensors").exists()  # the run really was interrupted
    done = subprocess.run([sys.executable, str(child), str(out), "5"], env=_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed, expected = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert resumed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), k
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the resumed run continued at step 3
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([h["loss"] for h in ref.history], rel=1e-6)
    assert not list(out.rglob("*.tmp"))


def test_torchrun_two_processes_match_single_process(tmp_path, child):
    """MUST SHOW (b): 2-process gloo run == 1 process with the same global batch."""
    ref_out = tmp_path / "single"
    _reference(child, ref_out, 3)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(child),
           str(out), "3"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    base = tiny_open_clip(0).model.state_dict()
    d = 64  # text width
    for k in a:
        x, y = a[k].clone(), b[k].clone()
        if k.endswith("attn.in_proj_bias"):
            # The key bias has an exactly-zero true gradient (softmax is shift-invariant), so its gradient is
            # float noise that differs with the reduction order, and AdamW normalises noise to lr-sized steps.
            # Everything with a real gradient must agree.
            x[d:2 * d] = y[d:2 * d] = 0
        assert torch.allclose(x, y, atol=1e-5, rtol=0), (k, float((x - y).abs().max()))
    assert not torch.allclose(a["transformer.resblocks.1.mlp.c_fc.weight"], base["transformer.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(a["transformer.resblocks.0.mlp.c_fc.weight"], base["transformer.resblocks.0.mlp.c_fc.weight"])
    loss = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(out) == pytest.approx(loss(ref_out), rel=1e-5)  # rank 0 logs the global-batch loss


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return real(src, dst)

    monkeypatch.setattr(loop.os, "replace", spy)
    ex = [Example(torch.randn(3, 32, 32), f"no effusion {i}", key=str(i)) for i in range(4)]
    selective_finetune(tiny_open_clip(0), SCALES, ex, lr=1e-3, steps=2, batch_size=2, out_dir=tmp_path,
                       checkpoint_every=1, progress=False)
    ckpts = [(s, d) for s, d in calls if d.name.startswith("ckpt-")]
    assert [d.name for _, d in ckpts] == ["ckpt-00000001", "ckpt-00000002"]
    for src, dst in ckpts:  # a complete temporary folder renamed into place
        assert src.parent == dst.parent and src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp")
    assert any(d.name == "latest" and s.name.endswith(".tmp") for s, d in calls)
    assert any(d.name == "model.safetensors" and s.name.endswith(".tmp") for s, d in calls)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["ckpt-00000001", "ckpt-00000002", "latest"]
    assert {p.name for p in (ck / "ckpt-00000002").iterdir()} == {"trainable.safetensors", "state.pt", "meta.json"}


def _tiny_examples(n=4):
    g = torch.Generator().manual_seed(1)
    return [Example(torch.randn(3, 32, 32, generator=g), f"no effusion {i}", key=str(i)) for i in range(n)]


def test_resume_refuses_another_config_or_model(tmp_path):
    selective_finetune(tiny_open_clip(0), SCALES, _tiny_examples(), lr=1e-3, steps=1, batch_size=2, out_dir=tmp_path,
                       progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"config\.lr: checkpoint 0\.001 vs now 0\.002"):
        selective_finetune(tiny_open_clip(0), SCALES, _tiny_examples(), lr=2e-3, steps=2, batch_size=2,
                           out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="weights_sum"):
        selective_finetune(tiny_open_clip(1), SCALES, _tiny_examples(), lr=1e-3, steps=2, batch_size=2,
                           out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="scales"):
        selective_finetune(tiny_open_clip(0), {"text.blocks.1": 1.0}, _tiny_examples(), lr=1e-3, steps=2,
                           batch_size=2, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, data, match", [
    ({}, [], "training set is empty"),
    ({"lr": 0.0}, None, "learning rate must be a positive"),
    ({"lr": -1.0}, None, "learning rate must be a positive"),
    ({"batch_size": 8}, None, "fewer than one batch"),
    ({"scales": {"vision.blocks.7": 1.0}}, None, "groups this model does not have"),
    ({"scales": {"text.blocks.0": -1.0}}, None, "finite and >= 0"),
    ({"scales": {"text.blocks.0": float("nan")}}, None, "finite and >= 0"),
])
def test_bad_input(tiny_clip, kwargs, data, match):
    kwargs = {"lr": 1e-3, "steps": 1, "batch_size": 2, "scales": SCALES, **kwargs}
    scales = kwargs.pop("scales")
    with pytest.raises(ValueError, match=match):
        selective_finetune(tiny_clip, scales, _tiny_examples() if data is None else data, progress=False, **kwargs)


def test_frozen_baseline_and_full_weights_roundtrip(tmp_path):
    model = tiny_open_clip(0)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    ex = _tiny_examples()
    res = selective_finetune(model, "frozen", ex, out_dir=tmp_path / "frozen", eval_retrieval=ex)
    assert res.steps == 0 and res.before == res.after and "retrieval" in res.after
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    selective_finetune(model, "full", ex, lr=1e-3, steps=1, batch_size=2, out_dir=tmp_path / "full", progress=False)
    assert not torch.equal(before["visual.conv1.weight"], model.model.visual.conv1.weight)  # full: vision moves too
    fresh = load_finetuned(tiny_open_clip(0), tmp_path / "full")
    for k, v in model.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k


def test_lora_adapters_roundtrip_and_merge(tmp_path):
    model = tiny_open_clip(0)
    ex = _tiny_examples()
    selective_finetune(model, SCALES, ex, method="lora", lr=1e-2, steps=2, batch_size=2, out_dir=tmp_path,
                       progress=False, lora_r=2)
    assert (tmp_path / "adapter.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        want = model.encode_text(["no pleural effusion."])
        base = tiny_open_clip(0).encode_text(["no pleural effusion."])
        merged = load_finetuned(tiny_open_clip(0), tmp_path)
        got = merged.encode_text(["no pleural effusion."])
    assert not torch.allclose(want, base, atol=1e-6)  # the adapters changed the tower
    assert torch.allclose(got, want, atol=1e-5)
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())  # merged: plain Linear layers again


def test_data_sources(tmp_path):
    from negtrace.data.phantom import build_phantom_dataset

    assert flip_negations("No pleural effusion. There is no pneumothorax.") == \
        "A pleural effusion. There is a pneumothorax."
    assert flip_negations("Small left effusion.") is None
    build_phantom_dataset(tmp_path / "ph", 3, 2, 0, size=32, progress=False)
    ex = load_examples(tmp_path / "ph")
    reports = [json.loads(line) for line in (tmp_path / "ph" / "reports_train.jsonl").read_text().splitlines()]
    assert [e.caption for e in ex] == [r["caption"] for r in reports]
    assert all(Path(e.image).is_file() for e in ex)
    assert all(e.negatives == ((flip_negations(e.caption),) if flip_negations(e.caption) else ()) for e in ex)
    (tmp_path / "pairs.csv").write_text("image,caption,negated_caption\na.png,no effusion,an effusion\nb.png,clear,\n")
    ex = load_examples(tmp_path / "pairs.csv")
    assert [(Path(e.image).name, e.caption, e.negatives) for e in ex] == [("a.png", "no effusion", ("an effusion",)),
                                                                          ("b.png", "clear", ())]
    (tmp_path / "bad.csv").write_text("image,text\na.png,x\n")
    with pytest.raises(ValueError, match="lacks caption"):
        load_examples(tmp_path / "bad.csv")


def test_cli_on_phantom_data(tmp_path):
    import importlib.util

    from negtrace.cli import main
    from negtrace.data.phantom import build_phantom_dataset
    from negtrace.data.schema import write_jsonl
    from negtrace.models.random_models import write_hf_clip_folder

    spec = write_hf_clip_folder(tmp_path / "model")
    build_phantom_dataset(tmp_path / "ph", 4, 3, 40, size=32, progress=False)
    bench = importlib.util.spec_from_file_location("nast_phantom", REPO / "benchmarks" / "nast_phantom.py")
    nast = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(nast)
    items = nast.polarity_items(tmp_path / "ph", "test", 6)  # complete phantom labels -> polarity MCQ items
    write_jsonl(tmp_path / "ph" / "polarity_test.jsonl", items)
    out = tmp_path / "run"
    code = main(["finetune", "--model", spec, "--train", str(tmp_path / "ph"), "--scales", "uniform", "--lr", "1e-3",
                 "--steps", "2", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu",
                 "--eval-polarity", str(tmp_path / "ph" / "polarity_test.jsonl")])
    assert code == 0
    after = json.loads((out / "eval_after.json").read_text())
    assert after["retrieval"]["n"] == 3  # the phantom val split
    pol = after["polarity"]
    assert pol["n_items"] == len(items) == 6
    assert pol["gap"]["value"] == pytest.approx(pol["accuracy_affirmative"]["value"] - pol["accuracy_negated"]["value"])
    assert json.loads((out / "eval_before.json").read_text())["polarity"]["n_items"] == 6
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["finetune", "--model", spec, "--train", str(tmp_path / "nothing"), "--scales", "uniform",
                 "--out", str(out)]) == 2


def test_accumulation_and_clipping_match_a_manual_sgd_step():
    import torch.nn.functional as F

    from negtrace.finetune.data import epoch_order

    g = torch.Generator().manual_seed(5)
    ex = [Example(torch.randn(3, 32, 32, generator=g), f"there is no effusion number {i}", key=str(i)) for i in range(8)]
    lr, clip = 0.5, 1e-3
    trained = tiny_open_clip(0)
    selective_finetune(trained, {"text.blocks.1": 1.0}, ex, optimizer="sgd", lr=lr, steps=1, batch_size=8, accum=2,
                       grad_clip=clip, schedule="constant", seed=4, progress=False)
    # oracle: two half-batch CLIP losses (written out with cross_entropy), gradients summed / 2, clipped, SGD step
    ref = tiny_open_clip(0)
    block = ref.model.transformer.resblocks[1]
    params = list(block.parameters())
    order = epoch_order(8, 4, 0)
    grads = [torch.zeros_like(p) for p in params]
    for half in (order[:4], order[4:]):
        img = F.normalize(ref.encode_image(torch.stack([ex[i].image for i in half])), dim=-1)
        txt = F.normalize(ref.encode_text([ex[i].caption for i in half]), dim=-1)
        logits = ref.logit_scale * img @ txt.T
        target = torch.arange(4)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        for acc, grad in zip(grads, torch.autograd.grad(loss, params), strict=True):
            acc += grad
    norm = torch.sqrt(sum((x ** 2).sum() for x in grads))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    assert coef < 1  # clipping is active in this test
    with torch.no_grad():
        expected = [p - lr * coef * grad for p, grad in zip(params, grads, strict=True)]
    got = list(trained.model.transformer.resblocks[1].parameters())
    for e, t in zip(expected, got, strict=True):
        assert torch.allclose(e, t, atol=1e-6, rtol=0)
    # unscaled groups are frozen: block 0 is exactly the untouched reference's
    assert torch.equal(trained.model.transformer.resblocks[0].mlp.c_fc.weight,
                       ref.model.transformer.resblocks[0].mlp.c_fc.weight)


def test_reports_longer_than_the_context_are_truncated_not_fatal():
    """Phantom (and real) reports can outrun CLIP's 77 tokens; training cuts them as open_clip does."""
    g = torch.Generator().manual_seed(2)
    long = "there is no pleural effusion and no pneumothorax. " * 12
    model = tiny_open_clip(0)
    assert model.tokenize([long], truncate=True).lengths.item() == model.tokenizer.context_length
    ex = [Example(torch.randn(3, 32, 32, generator=g), long + str(i), key=str(i)) for i in range(4)]
    before = {k: v.clone() for k, v in model.unwrap().state_dict().items()}
    selective_finetune(model, SCALES, ex, lr=1e-3, steps=1, batch_size=2, progress=False)
    changed = [k for k, v in model.unwrap().state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("transformer.resblocks.1") or k.startswith("transformer.resblocks.2")
                           for k in changed)
