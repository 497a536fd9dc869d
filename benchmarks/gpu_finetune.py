"""One epoch of selective fine-tuning on a ViT-B-32-sized CLIP in bf16, methods "lr" and "lora".

Prints steps/s, examples/s and peak GPU memory per method. Without a GPU it runs at reduced
size on CPU (tiny open_clip, fewer examples) so the script itself stays checked.

    python benchmarks/gpu_finetune.py                       # GPU: ViT-B-32, 1024 examples, batch 64
    python benchmarks/gpu_finetune.py --examples 64 --batch 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from negtrace.finetune.data import Example
from negtrace.finetune.loop import selective_finetune


def _examples(n: int, size: tuple[int, int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    findings = ["pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "edema"]
    return [Example(torch.randn(3, *size, generator=g), f"there is no {findings[i % 5]}. study {i}.",
                    (f"there is a {findings[i % 5]}. study {i}.",), key=str(i)) for i in range(n)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--examples", type=int, default=1024 if cuda else 32)
    p.add_argument("--batch", type=int, default=64 if cuda else 8)
    p.add_argument("--methods", nargs="+", default=["lr", "lora"])
    args = p.parse_args(argv)
    from negtrace.models.random_models import tiny_open_clip, vit_b32

    results = {}
    for method in args.methods:
        model = vit_b32(0) if cuda else tiny_open_clip(0)
        if cuda:
            model.model.cuda()
            torch.cuda.reset_peak_memory_stats()
        n = model.n_layers("text")
        scales = {f"text.blocks.{layer}": 0.1 + 0.9 * layer / max(1, n - 1) for layer in range(n)}
        scales.update({f"vision.blocks.{layer}": 0.5 for layer in range(model.n_layers("vision"))})
        data = _examples(args.examples, model.image_size)
        start = time.perf_counter()
        res = selective_finetune(model, scales, data, method=method, lr=1e-4, epochs=1, batch_size=args.batch,
                                 amp="auto", progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steady = [h["seconds"] for h in res.history[1:]] or [h["seconds"] for h in res.history]
        results[method] = {"model": repr(model), "device": "cuda" if cuda else "cpu", "bf16": cuda,
                           "steps": res.steps, "seconds_total": round(seconds, 2),
                           "steps_per_s": round(len(steady) / sum(steady), 3),
                           "examples_per_s": round(args.batch * len(steady) / sum(steady), 1),
                           "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                           "final_loss": round(res.history[-1]["loss"], 4)}
        r = results[method]
        print(f"{method:>5}: {r['steps']} steps, {r['steps_per_s']} steps/s ({r['examples_per_s']} ex/s), "
              f"peak GPU memory {r['peak_gpu_mem_gib']} GiB, loss {r['final_loss']}  [{r['model']}, {r['device']}]")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
