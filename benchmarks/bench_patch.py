"""Engine vs naive per-cell loop: full resid sweep of the text tower of random ViT-B-32.

The naive loop is what published causal-tracing code does: for every (example, layer,
position) one full forward of the corrupted text (padded to the context length) with a
single hook that writes the clean state, and a `.item()` per cell. To keep the run short
the naive loop runs on the first --naive-examples examples; throughput is cells per second
for each, measured side by side in this one run, and the max abs difference is taken over
the cells both computed.

    python benchmarks/bench_patch.py [--examples 16] [--naive-examples 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from negtrace.models.random_models import vit_b32
from negtrace.models.sites import hook_name
from negtrace.patching.engine import patch

SENTENCES = [
    "there is no pleural effusion.", "there is no pneumothorax.", "no focal consolidation is seen.",
    "the heart size is not enlarged.", "there is no evidence of pulmonary edema.", "lungs are clear without effusion.",
    "no acute rib fracture.", "there is no large left pleural effusion.", "negative for pneumothorax.",
    "no signs of pneumonia.", "there is no atelectasis at the right base.", "no pleural thickening.",
    "there is no lung nodule.", "free of consolidation.", "no enlarged cardiomediastinum.",
    "there is no opacity in the right upper zone.",
]


def naive(model, res, image) -> tuple[torch.Tensor, int]:
    L = model.n_layers("text")
    n = len(res.labels)
    names = [hook_name("text", "resid_pre", 0)] + [hook_name("text", "resid_post", i) for i in range(L)]
    _, cache = model.run_with_cache(texts=[res.text], names_filter=names)
    img = model.encode_image(image)

    def metric(text, hooks):
        with model.hooks(fwd_hooks=hooks):
            return model.logits(texts=[text], image_embeds=img)[0, 0].item()
    m_clean, m_corr = metric(res.text, []), metric(res.corrupted_text, [])
    grid = torch.zeros(L + 1, n)
    for row, name in enumerate(names):
        for p in range(n):
            def put(x, hook, p=p, name=name):
                x = x.clone()
                x[0, p] = cache[name][0, p]
                return x
            grid[row, p] = (metric(res.corrupted_text, [(name, put)]) - m_corr) / (m_clean - m_corr)
    return grid, (L + 1) * n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--naive-examples", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = vit_b32(seed=0)
    texts = SENTENCES[: args.examples]
    images = torch.randn(len(texts), 3, 224, 224, generator=torch.Generator().manual_seed(0))

    patch(model, texts[0], image=images[:1])  # warm-up
    t0 = time.perf_counter()
    results = patch(model, clean=texts, images=images, sites=("resid",), progress=False)
    engine_s = time.perf_counter() - t0
    L = model.n_layers("text")
    engine_cells = sum((L + 1) * len(r.labels) for r in results)
    rss_engine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    naive_cells, max_diff = 0, 0.0
    with torch.inference_mode():
        for res, image in zip(results[: args.naive_examples], images, strict=False):
            grid, cells = naive(model, res, image[None])
            naive_cells += cells
            max_diff = max(max_diff, float(((grid - res.site("resid")).abs() * abs(res.denominator)).max()))
    naive_s = time.perf_counter() - t0
    rss_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    engine_tp, naive_tp = engine_cells / engine_s, naive_cells / naive_s
    print(f"model: random ViT-B-32 (open_clip), text tower {L} layers; {len(texts)} negated sentences with images")
    print(f"engine: {engine_cells} cells in {engine_s:.2f}s  -> {engine_tp:.1f} cells/s")
    print(f"naive : {naive_cells} cells in {naive_s:.2f}s  -> {naive_tp:.1f} cells/s "
          f"(first {args.naive_examples} examples)")
    print(f"throughput ratio engine/naive: {engine_tp / naive_tp:.1f}x")
    print(f"max abs difference of effects (m_restored - m_corrupted) on shared cells: {max_diff:.2e}")
    print(f"peak RSS: {rss_engine:.0f} MiB after engine, {rss_total:.0f} MiB after naive loop")


if __name__ == "__main__":
    main()
