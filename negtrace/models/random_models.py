"""Random-initialised models of the real architectures, built offline.

Tests, benchmarks and the examples' ``--offline-random`` mode use these: the same code
paths as BiomedCLIP / CheXzero / PubMedCLIP, with weights nobody trained. Sizes: ``tiny``
for fast tests, ``base`` for the published shapes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .hooked import HookedVLM
from .zoo import load, wrap

CLINICAL_WORDS = """there is are no not a an the some with without of in on and or but free absent present
negative positive evidence sign signs seen identified clear ruled out resolved small large moderate left right
bilateral upper lower middle lobe zone pleural effusion pneumothorax cardiomegaly consolidation edema atelectasis
pneumonia opacity lung lesion nodule fracture devices support heart size normal enlarged cardiomediastinum
tube line pacemaker angle angles sharp costophrenic lungs expanded fully focal acute chest silhouette""".split()


def tiny_open_clip(seed: int = 0) -> HookedVLM:
    """open_clip ``CLIP`` with native towers: text 4x64 (4 heads, causal), ViT 3x64 on 32 px."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=4),
    ).eval()
    return wrap(model, open_clip.get_tokenizer("ViT-B-32"), name="tiny-open_clip")


def vit_b32(seed: int = 0, quickgelu: bool = False) -> HookedVLM:
    """open_clip ViT-B-32 (CheXzero's architecture) with random weights."""
    import open_clip

    torch.manual_seed(seed)
    name = "ViT-B-32-quickgelu" if quickgelu else "ViT-B-32"
    model = open_clip.create_model(name, pretrained=None).eval()
    return wrap(model, open_clip.get_tokenizer(name), name=f"{name} (random)")


def _wordpiece_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
            + sorted(set(CLINICAL_WORDS)))


def write_biomedclip_folder(folder: str | Path, seed: int = 0, size: str = "tiny") -> str:
    """Write a BiomedCLIP-layout open_clip folder (config + BERT config + vocab + random weights).

    Returns the ``local-dir:`` spec that :func:`negtrace.load` accepts.
    """
    import open_clip
    from transformers import BertConfig, BertTokenizerFast

    folder = Path(folder)
    bert_dir = folder / "text"
    bert_dir.mkdir(parents=True, exist_ok=True)
    vocab = _wordpiece_vocab()
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tiny = size == "tiny"
    BertConfig(vocab_size=len(vocab), hidden_size=64 if tiny else 768, num_hidden_layers=2 if tiny else 12,
               num_attention_heads=4 if tiny else 12, intermediate_size=128 if tiny else 3072,
               max_position_embeddings=512).save_pretrained(bert_dir)
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True,
                                  model_max_length=256)
    tokenizer.save_pretrained(bert_dir)
    tokenizer.save_pretrained(folder)  # open_clip's local-dir: reads the tokenizer from the folder root
    model_cfg = {
        "embed_dim": 32 if tiny else 512,
        "vision_cfg": {"timm_model_name": "test_vit" if tiny else "vit_base_patch16_224",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "image_size": 160 if tiny else 224},
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir),
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 64 if tiny else 256},
    }
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None, pretrained_hf=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def biomedclip_layout(folder: str | Path, seed: int = 0, size: str = "tiny") -> HookedVLM:
    return load(write_biomedclip_folder(folder, seed, size), device="cpu")


def write_hf_clip_folder(folder: str | Path, seed: int = 0, size: str = "tiny") -> str:
    """Write a transformers ``CLIPModel`` folder with a CLIP BPE tokenizer built from open_clip's vocabulary.

    Returns the ``hf:`` spec that :func:`negtrace.load` accepts.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    merges = [tuple(m) for m in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)]
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenAI's spelling
    vocab = {rename.get(k, k): v for k, v in bpe.encoder.items()}
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(folder)
    tiny = size == "tiny"
    text = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128} if tiny \
        else {}
    vision = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "image_size": 32, "patch_size": 8} if tiny else {"patch_size": 32}
    text.update(vocab_size=len(bpe.encoder), eos_token_id=bpe.eot_token_id, bos_token_id=bpe.sot_token_id,
                pad_token_id=bpe.eot_token_id)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32 if tiny else 512)).save_pretrained(folder)
    return f"hf:{folder}"


def hf_clip(folder: str | Path, seed: int = 0, size: str = "tiny") -> HookedVLM:
    return load(write_hf_clip_folder(folder, seed, size), device="cpu")
