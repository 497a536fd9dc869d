"""The embedded phantom model: training command, strict loading, preprocessing, alignment metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from negtrace.alignment import retrieval_recall, roc_auc
from negtrace.cli import main
from negtrace.models.phantom import (
    CONFIG_FILE,
    TINY_ARCH,
    WEIGHTS_FILE,
    PhantomWeightsError,
    available,
    build_clip,
    load_phantom,
    normalize_uint8,
    preprocess,
    sha256,
)
from negtrace.models.phantom_train import augment, text_batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny phantom dataset and a model trained on it for a few steps by the real command."""
    root = tmp_path_factory.mktemp("phantom")
    data, out, work = root / "data", root / "model", root / "work"
    assert main(["phantom", "build", "--out", str(data), "--n-train", "48", "--n-val", "16", "--n-test", "24",
                 "--size", "64", "--seed", "3"]) == 0
    assert main(["phantom", "train", "--data", str(data), "--out", str(out), "--work", str(work), "--arch", "tiny",
                 "--epochs", "2", "--batch-size", "16", "--warmup-steps", "2", "--seed", "5"]) == 0
    return data, out, work


def test_train_writes_weights_config_card_and_log(trained):
    data, out, work = trained
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["sha256"] == sha256(out / WEIGHTS_FILE)
    assert config["training"]["steps"] == 2 * (48 // 16)
    assert config["arch"] == TINY_ARCH
    assert "--arch tiny" in config["training"]["command"]
    auc = config["metrics"]["zero_shot_auc"]
    assert set(auc) >= {"Pleural Effusion", "mean"}
    assert 0 <= config["metrics"]["retrieval"]["image_to_text_R@5"] <= 1
    assert "Intended use" in (out / "README.md").read_text()
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "val_loss" in r]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(np.isfinite(r["val_loss"]) for r in epochs)
    assert all(v.dtype == torch.float16 for k, v in load_file(str(out / WEIGHTS_FILE)).items() if v.is_floating_point())


def test_loaded_model_equals_the_unhooked_model_on_the_stored_weights(trained):
    _, out, _ = trained
    hooked = load_phantom(folder=out)
    plain = build_clip(TINY_ARCH)
    plain.load_state_dict({k: v.float() for k, v in load_file(str(out / WEIGHTS_FILE)).items()})
    plain.eval()
    images = torch.randn(3, 3, 64, 64)
    texts = ["no pleural effusion.", "there is a small left pneumothorax.", "the lungs are clear."]
    with torch.no_grad():
        assert torch.equal(hooked.encode_image(images), plain.encode_image(images))
        ids = hooked.tokenize(texts).ids
        assert torch.allclose(hooked.encode_text(texts), plain.encode_text(ids), atol=1e-5)


def test_resume_refuses_a_checkpoint_of_another_configuration(trained):
    data, out, work = trained
    with pytest.raises(ValueError, match="different training configuration"):
        from negtrace.models.phantom_train import TrainConfig, train

        train(TrainConfig(data=str(data), out=str(out), work=str(work), epochs=3, batch_size=16,
                          arch=json.loads(json.dumps(TINY_ARCH))), progress=False)


def _copy_model(src, dst):
    dst.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_corrupted_weight_file_is_an_error_never_a_random_init(trained, tmp_path):
    _, out, _ = trained
    bad = _copy_model(out, tmp_path / "bad")
    raw = bytearray((bad / WEIGHTS_FILE).read_bytes())
    raw[-10] ^= 0xFF
    (bad / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(PhantomWeightsError, match="sha256"):
        load_phantom(folder=bad)


def test_weights_not_fitting_the_architecture_are_named(trained, tmp_path):
    _, out, _ = trained
    bad = _copy_model(out, tmp_path / "mismatch")
    state = load_file(str(bad / WEIGHTS_FILE))
    state.pop("visual.proj")
    state["text_projection"] = torch.zeros(3, 3, dtype=torch.float16)
    save_file(state, str(bad / WEIGHTS_FILE))
    config = json.loads((bad / CONFIG_FILE).read_text())
    config["sha256"] = sha256(bad / WEIGHTS_FILE)
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PhantomWeightsError, match=r"missing \['visual.proj'\].*text_projection"):
        load_phantom(folder=bad)


def test_missing_model_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="negtrace phantom train"):
        load_phantom(folder=tmp_path)


def test_uint8_fast_path_equals_the_pil_preprocess():
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    fast = normalize_uint8(torch.from_numpy(gray))
    slow = torch.stack([preprocess(64)(Image.fromarray(g)) for g in gray])
    assert torch.allclose(fast, slow, atol=1e-6)


def test_augment_translates_without_resampling():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    assert torch.equal(augment(images, 0, g), images)
    shifted = augment(images, 3, g)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    # every interior pixel of a shifted image is a pixel of the original, moved by one offset
    for a, b in zip(images, shifted, strict=True):
        found = any(torch.equal(b[3:29, 3:29], a[3 + dy:29 + dy, 3 + dx:29 + dx])
                    for dy in range(-3, 4) for dx in range(-3, 4))
        assert found


def test_text_batch_trims_to_the_longest_text_and_keeps_eot():
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :4] = torch.tensor([49406, 10, 11, 49407])
    ids[1, :6] = torch.tensor([49406, 10, 11, 12, 13, 49407])
    batch = text_batch(ids)
    assert batch.ids.shape == (2, 6) and batch.pooled_index.tolist() == [3, 5]


def test_roc_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    naive = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert roc_auc(scores, labels) == pytest.approx(naive, abs=1e-12)
    assert np.isnan(roc_auc(scores, np.zeros(60, bool)))


def test_retrieval_recall_matches_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    got = retrieval_recall(img, txt, ks=(1, 5))
    sims = img @ txt.T
    for k in (1, 5):
        i2t = np.mean([i in sims[i].topk(k).indices.tolist() for i in range(20)])
        t2i = np.mean([i in sims[:, i].topk(k).indices.tolist() for i in range(20)])
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)


@pytest.mark.skipif("phantom" not in available(), reason="embedded phantom weights not installed")
def test_embedded_phantom_loads_offline_and_matches_its_card():
    import negtrace

    model = negtrace.load("phantom")
    from negtrace.models.phantom import weights_dir

    config = json.loads((weights_dir() / CONFIG_FILE).read_text())
    assert model.image_size == (config["arch"]["vision_cfg"]["image_size"],) * 2
    assert sum(p.numel() * 2 for p in model.unwrap().parameters()) <= 21 * 2**20
    auc = config["metrics"]["zero_shot_auc"]
    assert auc["mean"] > 0.6
    emb = model.encode_text(["no pleural effusion.", "pleural effusion."], normalize=True)
    assert torch.isfinite(emb).all()


def test_complete_labels_turn_unmentioned_findings_into_absent(trained):
    from negtrace.data.labels import BLANK, read_labels
    from negtrace.models.phantom_train import complete_labels

    data, _, _ = trained
    table = read_labels(data / "labels_test.csv")
    full = complete_labels(table)
    before, after = table.findings, full.findings
    assert (after[before == 1] == 1).all()
    assert set(np.unique(after).tolist()) <= {0, 1}
    assert (before == BLANK).any() and (after[before == BLANK] == 0).all()
    assert np.array_equal(full.values[:, 0], table.values[:, 0])  # "No Finding" untouched


def test_zero_shot_auc_scores_match_a_direct_computation(tiny_clip):
    from negtrace.alignment import prompt_pair, zero_shot_auc

    findings = ("Cardiomegaly", "Pleural Effusion")
    g = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(30, tiny_clip.encode_text(["x"]).shape[-1], generator=g), dim=-1)
    present = np.random.default_rng(4).random((30, 2)) < 0.5
    pair = zero_shot_auc(tiny_clip, img, present, findings)
    positive = zero_shot_auc(tiny_clip, img, present, findings, mode="positive")
    for j, f in enumerate(findings):
        pos, neg = tiny_clip.encode_text(list(prompt_pair(f)), normalize=True).detach()
        s_pos, s_neg = img @ pos, img @ neg
        assert pair[f] == pytest.approx(roc_auc((s_pos - s_neg).numpy(), present[:, j]))  # softmax is monotone
        assert positive[f] == pytest.approx(roc_auc(s_pos.numpy(), present[:, j]))
    with pytest.raises(ValueError, match="mode"):
        zero_shot_auc(tiny_clip, img, present, findings, mode="both")
