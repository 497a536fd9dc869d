"""Where does CheXzero process negation? Causal tracing of its text tower.

CheXzero (Tiu et al., Nature Biomedical Engineering 2022) is OpenAI's CLIP ViT-B/32
fine-tuned on MIMIC-CXR images and report impressions. Its text tower is a causal
12-layer transformer with QuickGELU activations, so negtrace loads it as open_clip's
``ViT-B-32-quickgelu``.

Setup (from the repository root):

    python3 -m venv .venv && . .venv/bin/activate && pip install -e .

Weights: the authors publish their checkpoints on Google Drive, linked from the README of
https://github.com/rajpurkarlab/CheXzero ("CheXzero_Models"). Download one of them, e.g.
``best_64_5e-05_original_22000_0.864.pt`` (a plain PyTorch state dict of the OpenAI CLIP
module, about 600 MB), then:

    python examples/trace_chexzero.py --weights /models/best_64_5e-05_original_22000_0.864.pt \
        --out runs/chexzero [--image my_cxr.png] [--pdf]

Without the checkpoint (CI, a first look at the pipeline): the same architecture with
random weights, reduced to a tiny width by default (``--size base`` for ViT-B/32 shapes):

    python examples/trace_chexzero.py --offline-random --out runs/chexzero-random

Prints the strongest layer per site and writes ``heatmap.html``, ``cte.safetensors``,
``cte.json`` and ``summary.json`` to ``--out`` (see ``examples/_common.py``).
"""

from __future__ import annotations

import _common


def random_chexzero(size: str, seed: int):
    """CheXzero's architecture (open_clip CLIP, causal text tower, QuickGELU) with random weights."""
    if size == "base":
        from negtrace.models.random_models import vit_b32

        return vit_b32(seed=seed, quickgelu=True)
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    import negtrace as nt

    torch.manual_seed(seed)
    model = open_clip.CLIP(  # ViT-B-32-quickgelu's layout with fewer, narrower layers
        embed_dim=64, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=16, image_size=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=4),
    ).eval()
    return nt.wrap(model, open_clip.get_tokenizer("ViT-B-32-quickgelu"), name="CheXzero layout (tiny, random)")


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n")[0], "CheXzero checkpoint (.pt state dict from the authors' release)")
    args = p.parse_args(argv)
    _common.default_out(args, "chexzero-random" if args.offline_random else "chexzero")
    if args.offline_random:
        model = random_chexzero(args.size, args.seed)
        label = f"CheXzero architecture ({args.size}, random init)"
    else:
        if args.weights is None:
            p.error("pass --weights best_64_...pt (see the docstring for where to get it) or --offline-random")
        import negtrace as nt

        model = nt.load("ViT-B-32-quickgelu", pretrained=args.weights, device=args.device)
        label = "CheXzero"
    _common.trace(model, args, model_label=label, random_weights=args.offline_random)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
