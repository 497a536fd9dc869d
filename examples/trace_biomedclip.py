"""Where does BiomedCLIP process negation? Causal tracing of its PubMedBERT text tower.

BiomedCLIP (Zhang et al. 2023, "BiomedCLIP: a multimodal biomedical foundation model
pretrained from fifteen million scientific image-text pairs") pairs a PubMedBERT text
encoder (12 bidirectional layers, 256 tokens, CLS pooling) with a ViT-B/16 image encoder
(timm). negtrace loads it through open_clip as a ``CustomTextCLIP``.

Setup (from the repository root):

    python3 -m venv .venv && . .venv/bin/activate && pip install -e .

Weights come from the Hugging Face Hub, repository
``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (open_clip config +
``open_clip_pytorch_model.bin``; its text model/tokenizer are fetched from
``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract`` by the config). With network
access nothing else is needed:

    python examples/trace_biomedclip.py --out runs/biomedclip [--image my_cxr.png] [--pdf]

Offline: on a connected machine run
``huggingface-cli download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --local-dir biomedclip``,
download the BERT repository the same way, point ``hf_model_name`` and ``hf_tokenizer_name`` in
``biomedclip/open_clip_config.json`` at that second folder, copy both here, then

    python examples/trace_biomedclip.py --weights biomedclip --out runs/biomedclip

Without any weights (CI, a first look at the pipeline): the same layout (BERT text tower,
timm ViT, open_clip config folder) with random weights, tiny by default (``--size base``
for the published shapes; slow on a CPU):

    python examples/trace_biomedclip.py --offline-random --out runs/biomedclip-random

Prints the strongest layer per site and writes ``heatmap.html``, ``cte.safetensors``,
``cte.json`` and ``summary.json`` to ``--out`` (see ``examples/_common.py``). BERT attends in
both directions, so every position of every layer is traced, not only those after the cue.
"""

from __future__ import annotations

import tempfile

import _common


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n")[0],
                       "local BiomedCLIP folder (open_clip_config.json + weights); default: the Hugging Face Hub")
    args = p.parse_args(argv)
    _common.default_out(args, "biomedclip-random" if args.offline_random else "biomedclip")
    import negtrace as nt

    with tempfile.TemporaryDirectory(prefix="negtrace-biomedclip-") as scratch:
        if args.offline_random:
            from negtrace.models.random_models import write_biomedclip_folder

            spec = write_biomedclip_folder(scratch, seed=args.seed, size=args.size)
            model = nt.load(spec, device=args.device or "cpu")
            label = f"BiomedCLIP layout ({args.size}, random init)"
        elif args.weights:
            model = nt.load(f"local-dir:{args.weights}", device=args.device)
            label = f"BiomedCLIP ({args.weights})"
        else:
            model = nt.load("biomedclip", device=args.device)
            label = "BiomedCLIP"
        _common.trace(model, args, model_label=label, random_weights=args.offline_random)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
