"""The embedded phantom models: their architecture, preprocessing, and loading.

``phantom`` is an open_clip ``CLIP`` shaped like CheXzero (ViT-B/32-style patches of 32 px on
224 px images, QuickGELU, a causal 77-token text transformer with open_clip's BPE vocabulary)
but small, trained on negtrace's procedural chest-radiograph phantoms by
``negtrace phantom train`` (see :mod:`negtrace.models.phantom_train`). Weights ship inside the
package as fp16 safetensors next to a ``config.json`` (architecture, training run, metrics,
sha256 of the weight file) and a model card.

Loading never falls back to random initialisation: a missing, corrupted or mismatched weight
file is an error that says which.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .hooked import HookedVLM

WEIGHTS_ROOT = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# open_clip CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu) keyword arguments.
PHANTOM_ARCH: dict[str, Any] = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}

# The same layout at test size (CI trains it for a few steps to keep the training path alive).
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
ARCHS = {"phantom": PHANTOM_ARCH, "tiny": TINY_ARCH}

# OpenAI CLIP's normalisation, as CheXzero uses (grayscale radiographs repeated to 3 channels).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class PhantomWeightsError(RuntimeError):
    """The shipped weights are missing, corrupted, or do not fit the architecture."""


def build_clip(arch: Mapping[str, Any] = PHANTOM_ARCH) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` of the given architecture."""
    from open_clip.model import CLIP

    return CLIP(arch["embed_dim"], dict(arch["vision_cfg"]), dict(arch["text_cfg"]),
                quick_gelu=bool(arch.get("quick_gelu", False)))


def preprocess(size: int):
    """PIL image -> normalised (3, size, size) tensor, as open_clip's eval transform."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD)


def normalize_uint8(images: Tensor) -> Tensor:
    """(B, H, W) uint8 grayscale -> (B, 3, H, W) float, identical to :func:`preprocess` at H = W = size."""
    x = images.float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def wrap_clip(model: nn.Module, arch: Mapping[str, Any], name: str) -> HookedVLM:
    import open_clip

    from .zoo import wrap

    tokenizer = open_clip.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
    return wrap(model, tokenizer=tokenizer, preprocess=preprocess(arch["vision_cfg"]["image_size"]), name=name)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_dir(name: str = "phantom") -> Path:
    return WEIGHTS_ROOT / name


def available() -> list[str]:
    """Names of the embedded models present in this installation."""
    if not WEIGHTS_ROOT.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_ROOT.iterdir() if (p / CONFIG_FILE).is_file())


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no embedded model at {folder} ({CONFIG_FILE} missing). Installed embedded models: "
            f"{available() or 'none'}. Train one with `negtrace phantom build` then `negtrace phantom train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PhantomWeightsError(f"{path} is not valid JSON ({exc}); reinstall negtrace or retrain") from exc


def load_state(folder: Path, config: Mapping[str, Any], model: nn.Module) -> None:
    """Load ``folder/model.safetensors`` into ``model`` strictly (checksum, names, shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise PhantomWeightsError(f"{path} is missing; the embedded model is incomplete (reinstall negtrace)")
    expected = config.get("sha256")
    if expected and sha256(path) != expected:
        raise PhantomWeightsError(f"{path} does not match the sha256 recorded in {CONFIG_FILE}: the file is "
                                  "corrupted or was replaced; reinstall negtrace or retrain")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PhantomWeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise PhantomWeightsError(
            f"{path} does not fit the architecture in {CONFIG_FILE}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_phantom(name: str = "phantom", folder: str | Path | None = None) -> HookedVLM:
    """Load an embedded phantom model (``"phantom"``) or one written by ``negtrace phantom train``."""
    where = Path(folder) if folder is not None else weights_dir(name)
    config = read_config(where)
    if config.get("family") != "open_clip":
        raise NotImplementedError(f"{where}: embedded model family {config.get('family')!r} is not supported")
    model = build_clip(config["arch"])
    load_state(where, config, model)
    model.eval()
    return wrap_clip(model, config["arch"], name=name)
