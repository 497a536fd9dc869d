"""``negtrace.load``: every way a user has a model, to a :class:`HookedVLM`.

Known names (``biomedclip``, ``chexzero``, ``pubmedclip``, ``phantom``) are shortcuts for
the specs below; everything else is an open_clip model name, an open_clip ``hf-hub:`` /
``local-dir:`` spec, a transformers ``hf:<id or folder>`` spec, or an already-built model.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .hooked import HookedVLM
from .tokens import BPETokenizer, HFTokenizer

KNOWN: dict[str, dict] = {
    "biomedclip": {"spec": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                   "about": "BiomedCLIP (Zhang et al. 2023): PubMedBERT text tower, ViT-B/16 timm trunk"},
    "chexzero": {"spec": "ViT-B-32-quickgelu", "needs_pretrained": True,  # OpenAI CLIP uses QuickGELU
                 "about": "CheXzero (Tiu et al. 2022): OpenAI CLIP ViT-B/32 fine-tuned on MIMIC-CXR; pass "
                          "pretrained='path/to/best_64_0.0001_original_*.pt' (download from the CheXzero release)"},
    "pubmedclip": {"spec": "hf:flaviagiammarino/pubmed-clip-vit-base-patch32",
                   "about": "PubMedCLIP (Eslami et al. 2023): transformers CLIPModel ViT-B/32 fine-tuned on ROCO"},
}


class HubUnavailableError(RuntimeError):
    pass


def _hub_error(spec: str, exc: Exception) -> HubUnavailableError:
    repo = spec.split(":", 1)[1]
    kind = "open_clip" if spec.startswith("hf-hub:") else "transformers"
    local = "local-dir:/path/to/folder" if kind == "open_clip" else "hf:/path/to/folder"
    return HubUnavailableError(
        f"could not fetch {repo!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:200]}). "
        f"Without network access, download it on a connected machine "
        f"(`huggingface-cli download {repo} --local-dir /path/to/folder`), copy the folder here and load it with "
        f"negtrace.load({local!r}). Note that a BiomedCLIP-style folder's open_clip_config.json names its text "
        f"model and tokenizer ('hf_model_name', 'hf_tokenizer_name'): point both at local folders too."
    )


def _fail_fast_hub() -> None:
    # huggingface_hub retries for a long time on a closed network; keep the first try short.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _wrap_open_clip(model: nn.Module, tokenizer, preprocess: Callable | None, name: str) -> HookedVLM:
    import open_clip
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    from .adapters.open_clip import towers_for

    text, vision = towers_for(model)
    if tokenizer is None:
        raise ValueError("pass tokenizer= with an open_clip model object (e.g. open_clip.get_tokenizer(name))")
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        tok = BPETokenizer(tokenizer, getattr(model, "context_length", None) or tokenizer.context_length)
    elif isinstance(tokenizer, OpenClipHFTokenizer):
        pool = "first" if text.family == "open_clip-hf" else "eos"
        tok = HFTokenizer(tokenizer.tokenizer, tokenizer.context_length, pool=pool, clean_fn=tokenizer.clean_fn,
                          strip_sep=tokenizer.strip_sep_token)
    elif isinstance(tokenizer, (BPETokenizer, HFTokenizer)):
        tok = tokenizer
    else:
        raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}; pass open_clip.get_tokenizer(...)")
    if preprocess is None:
        cfg = getattr(model.visual, "preprocess_cfg", {})
        preprocess = open_clip.image_transform(vision.image_size, is_train=False,
                                               mean=cfg.get("mean"), std=cfg.get("std"))
    wrapped = HookedVLM(model, text, vision, tok, preprocess, name=name,
                        logit_scale=lambda m: m.logit_scale.exp())
    return wrapped


def _wrap_hf_clip(model: nn.Module, tokenizer, preprocess: Callable | None, name: str) -> HookedVLM:
    from .adapters.hf_clip import towers_for

    text, vision = towers_for(model)
    if tokenizer is None:
        raise ValueError("pass tokenizer= (a fast transformers tokenizer) with a transformers CLIPModel")
    if not isinstance(tokenizer, HFTokenizer):
        cfg = model.config.text_config
        pool = "argmax" if cfg.eos_token_id == 2 else "eos"
        tokenizer = HFTokenizer(tokenizer, cfg.max_position_embeddings, pool=pool, eos_token_id=cfg.eos_token_id)
    if preprocess is None:
        preprocess = _default_preprocess(model.config.vision_config.image_size)
    wrapped = HookedVLM(model, text, vision, tokenizer, preprocess, name=name,
                        logit_scale=lambda m: m.logit_scale.exp())
    return wrapped


def _default_preprocess(size: int) -> Callable:
    import open_clip

    return open_clip.image_transform(size, is_train=False)


def wrap(model: nn.Module, tokenizer=None, preprocess: Callable | None = None, name: str | None = None) -> HookedVLM:
    """Wrap an already-built model. Raises listing the supported families otherwise."""
    cls = type(model).__name__
    import open_clip

    if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        return _wrap_open_clip(model, tokenizer, preprocess, name or cls)
    try:
        from transformers import CLIPModel
    except ImportError:  # pragma: no cover
        CLIPModel = ()
    if isinstance(model, CLIPModel):
        return _wrap_hf_clip(model, tokenizer, preprocess, name or cls)
    if isinstance(model, HookedVLM):
        return model
    raise TypeError(
        f"no negtrace adapter knows {cls}. Supported families: open_clip CLIP (native text + ViT towers, e.g. "
        "ViT-B-32, CheXzero), open_clip CustomTextCLIP (HF BERT text + timm ViT, e.g. BiomedCLIP), transformers "
        "CLIPModel (e.g. PubMedCLIP)."
    )


def load(spec: str | nn.Module, *, pretrained: str | None = None, tokenizer=None, preprocess: Callable | None = None,
         device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HookedVLM:
    """Load and wrap a dual encoder. See the module docstring for the accepted specs.

    >>> model = load("phantom")                                  # embedded, offline
    >>> model = load("ViT-B-32-quickgelu", pretrained="chexzero.pt")
    >>> model = load("local-dir:/models/biomedclip")
    >>> model = load("hf:/models/pubmedclip")
    """
    dev = _device(device)
    if isinstance(spec, nn.Module):
        wrapped = wrap(spec, tokenizer, preprocess)
        return _place(wrapped, dev, dtype)
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError("spec must be a model name/spec string or a model object")
    key = spec.lower()
    if key.startswith("phantom"):
        from .phantom import load_phantom

        return _place(load_phantom(key), dev, dtype)
    if key in KNOWN:
        entry = KNOWN[key]
        if entry.get("needs_pretrained") and pretrained is None:
            raise ValueError(f"{spec!r} needs weights: {entry['about']}")
        spec = entry["spec"]
    if spec.startswith("hf:"):
        return _place(_load_transformers(spec, tokenizer, preprocess), dev, dtype)
    return _place(_load_open_clip(spec, pretrained, tokenizer, preprocess), dev, dtype)


def _place(model: HookedVLM, device: torch.device, dtype: torch.dtype | None) -> HookedVLM:
    model.model.to(device=device, dtype=dtype) if dtype else model.model.to(device)
    return model.eval()


def _load_open_clip(spec: str, pretrained: str | None, tokenizer, preprocess) -> HookedVLM:
    import open_clip

    is_hub = spec.startswith("hf-hub:")
    if not (is_hub or spec.startswith("local-dir:")) and spec not in open_clip.list_models():
        close = difflib.get_close_matches(spec, open_clip.list_models() + list(KNOWN), n=5)
        raise ValueError(f"unknown model {spec!r}. Close matches: {close or 'none'}. Use an open_clip model name "
                         f"(open_clip.list_models()), one of {sorted(KNOWN) + ['phantom']}, 'hf-hub:<repo>', "
                         "'local-dir:<folder>' or 'hf:<transformers id or folder>'")
    if spec.startswith("local-dir:") and not Path(spec.split(":", 1)[1]).is_dir():
        raise FileNotFoundError(f"{spec}: no such folder")
    # a pretrained tag ("openai", "laion2b_s34b_b79k") is open_clip's business; a file path is ours to check
    names_a_file = bool(pretrained) and ((not is_hub and "/" in pretrained) or bool(Path(pretrained).suffix))
    if names_a_file and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights {pretrained!r} not found")
    if is_hub:
        _fail_fast_hub()
    try:
        model, _, val_preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
        tok = tokenizer or open_clip.get_tokenizer(spec)
    except (OSError, ConnectionError, RuntimeError) as exc:
        if is_hub or "huggingface" in str(exc).lower() or "hf_hub" in str(exc).lower():
            raise _hub_error(spec if is_hub else f"hf-hub:{spec}", exc) from exc
        raise
    return wrap(model, tok, preprocess or val_preprocess, name=spec)


def _load_transformers(spec: str, tokenizer, preprocess) -> HookedVLM:
    from transformers import AutoTokenizer, CLIPModel

    target = spec.split(":", 1)[1]
    local = Path(target).is_dir()
    if not local:
        _fail_fast_hub()
    try:
        model = CLIPModel.from_pretrained(target)
        tok = tokenizer or AutoTokenizer.from_pretrained(target, use_fast=True)
    except OSError as exc:
        if local:
            raise
        raise _hub_error(spec, exc) from exc
    return wrap(model, tok, preprocess, name=spec)
