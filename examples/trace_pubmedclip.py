"""Where does PubMedCLIP process negation? Causal tracing of its CLIP text tower.

PubMedCLIP (Eslami, Meinel and de Melo, EACL Findings 2023, "PubMedCLIP: how much does
CLIP benefit visual question answering in the medical domain?") is OpenAI's CLIP ViT-B/32
fine-tuned on the ROCO radiology image-caption pairs. negtrace loads the transformers port
as a ``CLIPModel`` (causal 12-layer text tower, EOT pooling).

Setup (from the repository root):

    python3 -m venv .venv && . .venv/bin/activate && pip install -e .

Weights come from the Hugging Face Hub, repository
``flaviagiammarino/pubmed-clip-vit-base-patch32``. With network access:

    python examples/trace_pubmedclip.py --out runs/pubmedclip [--image my_cxr.png] [--pdf]

Offline: on a connected machine run
``huggingface-cli download flaviagiammarino/pubmed-clip-vit-base-patch32 --local-dir pubmedclip``,
copy the folder here, then

    python examples/trace_pubmedclip.py --weights pubmedclip --out runs/pubmedclip

Without any weights (CI, a first look at the pipeline): a transformers ``CLIPModel``
folder with CLIP's BPE tokenizer and random weights, tiny by default (``--size base`` for
ViT-B/32 shapes):

    python examples/trace_pubmedclip.py --offline-random --out runs/pubmedclip-random

Prints the strongest layer per site and writes ``heatmap.html``, ``cte.safetensors``,
``cte.json`` and ``summary.json`` to ``--out`` (see ``examples/_common.py``).
"""

from __future__ import annotations

import tempfile

import _common


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n")[0],
                       "local transformers CLIPModel folder; default: the Hugging Face Hub")
    args = p.parse_args(argv)
    _common.default_out(args, "pubmedclip-random" if args.offline_random else "pubmedclip")
    import negtrace as nt

    with tempfile.TemporaryDirectory(prefix="negtrace-pubmedclip-") as scratch:
        if args.offline_random:
            from negtrace.models.random_models import write_hf_clip_folder

            spec = write_hf_clip_folder(scratch, seed=args.seed, size=args.size)
            model = nt.load(spec, device=args.device or "cpu")
            label = f"PubMedCLIP layout ({args.size}, random init)"
        elif args.weights:
            model = nt.load(f"hf:{args.weights}", device=args.device)
            label = f"PubMedCLIP ({args.weights})"
        else:
            model = nt.load("pubmedclip", device=args.device)
            label = "PubMedCLIP"
        _common.trace(model, args, model_label=label, random_weights=args.offline_random)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
