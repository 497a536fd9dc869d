"""Batched causal-tracing sweeps: restore clean states into a corrupted run, cell by cell.

Batch layout (in the spirit of ROME's ``trace_with_patch`` docstring). For a sweep over
``B`` examples with ``S`` corruption samples (S = 1 unless ``corrupt="noise"``):

* the clean batch has ``B`` rows and the corrupted batch ``B * S`` rows (row ``b * S + s``);
* both are run once; every layer-boundary residual state, and the attention / MLP outputs
  and per-head values the sweep needs, are cached;
* a *restoration row* is (example b, sample s, cell): cell = (layer l, position p) for
  resid / attn / mlp or (layer l, head h) for heads. Rows that start at the same block are
  packed into one batch: each starts from the cached corrupted state entering that block
  (nothing below it can change), the clean state is written at the row's position with one
  indexed write, and only the blocks above run. The other tower is encoded once.
* what cannot change is never computed: texts are truncated to their effective length
  (EOT + 1 in causal towers, the longest real text in bidirectional ones); in causal towers
  positions before the first corrupted token are identical in both runs, so their CTE is
  exactly 0 and they are skipped.

The restored metric is averaged over samples; then
``CTE = (mean_s m_restored - mean_s m(x~)) / (m(x) - mean_s m(x~))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.hooked import HookedVLM
from ..models.sites import hook_name
from ..models.tokens import Tokenized
from ..negation.corrupt import PreparedText, embedding_noise_std, noise_tensor, prepare
from .metrics import METRICS, Metric, unit
from .result import CTEResult
from .roles import generic_roles

SITES = ("resid", "attn", "mlp")
_SITE_HOOK = {"attn": "attn_out", "mlp": "mlp_out"}


@dataclass
class _Rows:
    """Restoration rows of one group (same starting block)."""

    example: Tensor  # (R,) example index b
    corrupted_row: Tensor  # (R,) row in the corrupted batch, b * S + s
    cell: Tensor  # (R,) position p, or head h for head sweeps
    out_index: Tensor  # (R,) flat index into the (B, S, n_rows, n_cols) result grid


def _stack_tokens(preps: list[PreparedText], which: str, pad_id: int, pooled: list[int]) -> Tokenized:
    ids_lists = [getattr(p, f"{which}_ids") for p in preps]
    t = max(len(x) for x in ids_lists)
    ids = torch.full((len(preps), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(preps), t), dtype=torch.bool)
    for i, row in enumerate(ids_lists):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return Tokenized([getattr(p, which) for p in preps], ids, mask, [p.tokens for p in preps],
                     [[] for _ in preps], torch.tensor(pooled))


class _Sweep:
    """Caches of one batch of examples, and the batched restoration runs over them."""

    def __init__(self, model: HookedVLM, tower: str, clean_inputs, corrupted_inputs, samples: int,
                 embed_noise: Tensor | None, sites: Sequence[str], heads: bool, metric: Metric,
                 row_budget: int):
        self.model, self.tower, self.samples, self.metric = model, tower, samples, metric
        self.adapter = model.adapters[tower]
        self.L = self.adapter.n_layers
        self.row_budget = row_budget
        need = [_SITE_HOOK[s] for s in sites if s in _SITE_HOOK] + (["z"] if heads else [])
        self.clean_h, self.clean_sites, self.clean_state, self.clean_emb = self._run(clean_inputs, None, need)
        self.corr_h, _, self.corr_state, self.corr_emb = self._run(corrupted_inputs, embed_noise, [])

    def _run(self, inputs, noise: Tensor | None, sites: list[str]):
        model, tower = self.model, self.tower
        cache: dict[str, Tensor] = {}
        hooks = [(hook_name(tower, s, layer), self._saver(cache)) for s in sites for layer in range(self.L)]
        if noise is not None:
            hooks.append((hook_name(tower, "embed"), lambda x, hook: x + noise.to(x.dtype)))
        with model.hooks(fwd_hooks=hooks):
            x, state = model.embed(tower, inputs)
            hs = [x]
            for layer in range(self.L):
                hs.append(self.adapter.block(layer, hs[-1], state))
            emb = model.finish(tower, hs[-1], state)
        return hs, cache, state, emb

    @staticmethod
    def _saver(cache):
        def save(x, hook):
            cache[hook.name] = x.detach()
        return save

    def _finish_rows(self, x: Tensor, start: int, state, rows: _Rows, hooks) -> Tensor:
        with self.model.hooks(fwd_hooks=hooks):
            for layer in range(start, self.L):
                x = self.adapter.block(layer, x, state)
            emb = self.model.finish(self.tower, x, state)
        return self.metric(emb, rows.example)

    def _chunks(self, rows: _Rows):
        n = rows.example.shape[0]
        for i in range(0, n, self.row_budget):
            sl = slice(i, i + self.row_budget)
            yield _Rows(rows.example[sl], rows.corrupted_row[sl], rows.cell[sl], rows.out_index[sl])

    def _restore(self, start: int, rows: _Rows, edit) -> tuple[Tensor, Tensor]:
        """Run each chunk of ``rows`` from the corrupted state entering block ``start``.

        ``edit(chunk, x)`` returns the start state (possibly with clean values written in) and
        the hooks that write clean values further up. Returns (restored metric, out_index)."""
        outs, index = [], []
        for chunk in self._chunks(rows):
            x, hooks = edit(chunk, self.corr_h[start][chunk.corrupted_row])
            state = self.adapter.repeat(self.corr_state, chunk.corrupted_row)
            outs.append(self._finish_rows(x, start, state, chunk, hooks))
            index.append(chunk.out_index)
        return torch.cat(outs), torch.cat(index)

    def restore_resid(self, layer: int, rows: _Rows) -> tuple[Tensor, Tensor]:
        """Restore the residual state entering block ``layer`` at each row's position."""
        def edit(chunk: _Rows, x: Tensor):
            x = x.clone()
            x[torch.arange(x.shape[0]), chunk.cell] = self.clean_h[layer][chunk.example, chunk.cell]
            return x, []
        return self._restore(layer, rows, edit)

    def restore_site(self, site: str, layers: list[int], rows: _Rows) -> tuple[Tensor, Tensor]:
        """Restore ``site`` (attn/mlp) at every layer of ``layers`` (a ROME window) at each row's position."""
        names = [hook_name(self.tower, _SITE_HOOK[site], layer) for layer in layers]

        def edit(chunk: _Rows, x: Tensor):
            return x, [(name, _write_positions(chunk.cell, self.clean_sites[name][chunk.example, chunk.cell]))
                       for name in names]
        return self._restore(layers[0], rows, edit)

    def restore_heads(self, layer: int, rows: _Rows) -> tuple[Tensor, Tensor]:
        """Restore one head's z at every position (row cell = head index)."""
        name = hook_name(self.tower, "z", layer)

        def edit(chunk: _Rows, x: Tensor):
            return x, [(name, _write_heads(chunk.cell, self.clean_sites[name][chunk.example, :, chunk.cell]))]
        return self._restore(layer, rows, edit)


def _write_positions(cell: Tensor, clean: Tensor):
    """Hook writing ``clean[r]`` (R, D) at position ``cell[r]`` of row r."""
    def write(x, hook):
        x = x.clone()
        x[torch.arange(x.shape[0]), cell] = clean.to(x.dtype)
        return x
    return write


def _write_heads(cell: Tensor, clean: Tensor):
    """Hook writing ``clean[r]`` (R, T, Dh) into head ``cell[r]`` of row r's z (R, T, H, Dh)."""
    def write(z, hook):
        z = z.clone()
        z[torch.arange(z.shape[0]), :, cell] = clean.to(z.dtype)
        return z
    return write


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    lo = max(0, layer - window // 2)
    hi = min(n_layers, lo + window)
    return list(range(lo, hi))


def _row_budget(model: HookedVLM, tower: str, length: int, memory_mb: float) -> int:
    a = model.adapters[tower]
    per_row = length * a.d_model * 4 * 16 + a.n_heads * length * length * 4 * 4  # activations + attention
    return max(1, int(memory_mb * 2**20 // per_row))


def _progress(enabled: bool | None, total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=not enabled if enabled is not None else total < 50, leave=False)


def _measure_cells(sw: _Sweep, positions: list[list[int]], T: int, *, sites: Sequence[str], heads: bool,
                   window: int, progress: bool | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """Restore every (site, layer row, position) of ``positions`` and every (layer, head); tower-generic.

    Returns per-site restored metrics (B, L+1, T), mean over samples, NaN where nothing was
    measured (row 0 of attn/mlp, positions not listed), and head metrics (B, L, H) or None."""
    L, B, S = sw.L, len(positions), sw.samples
    out: dict[str, Tensor] = {}
    bar = _progress(progress, len(sites) * (L + 1) + (L if heads else 0), f"patching {sw.tower}")
    for site in sites:
        grid = torch.full((B * S * (L + 1) * T,), float("nan"))
        for layer_row in range(L + 1):
            if site != "resid" and layer_row == 0:
                continue
            rows = _cell_rows(positions, S, layer_row, L + 1, T)
            if site == "resid":
                vals, idx = sw.restore_resid(layer_row, rows)
            else:
                vals, idx = sw.restore_site(site, _window(layer_row - 1, window, L), rows)
            grid[idx.cpu()] = vals.float().cpu()
            bar.update(1)
        out[site] = grid.view(B, S, L + 1, T).mean(1)
    head_grid = None
    if heads:
        H = sw.adapter.n_heads
        head_grid = torch.full((B * S * L * H,), float("nan"))
        for layer in range(L):
            vals, idx = sw.restore_heads(layer, _cell_rows([list(range(H))] * B, S, layer, L, H))
            head_grid[idx.cpu()] = vals.float().cpu()
            bar.update(1)
        head_grid = head_grid.view(B, S, L, H).mean(1)
    bar.close()
    return out, head_grid


def _baselines(sw: _Sweep) -> tuple[Tensor, Tensor]:
    """m(x) per example (B,) and m(x~) averaged over samples (B,), in float32 on the CPU."""
    B = sw.clean_emb.shape[0]
    ex = torch.arange(B, device=sw.clean_emb.device)
    m_clean = sw.metric(sw.clean_emb, ex)
    m_corr = sw.metric(sw.corr_emb, ex.repeat_interleave(sw.samples)).view(B, sw.samples).mean(1)
    return m_clean.float().cpu(), m_corr.float().cpu()


@torch.inference_mode()
def sweep(model: HookedVLM, preps: list[PreparedText], tower_inputs: dict, metric: Metric, *, sites: Sequence[str],
          heads: bool, window: int, samples: int, noise: Tensor | None, memory_mb: float,
          progress: bool | None) -> tuple[dict[str, Tensor], Tensor | None, Tensor, Tensor]:
    """Text-tower sweep over a batch. Returns per-site restored metrics (B, L+1, T_eff) with
    NaN where nothing was measured, head metrics (B, L, H), m_clean (B,), m_corr (B,)."""
    adapter = model.adapters["text"]
    lengths = [len(p.clean_ids) for p in preps]
    T = max(lengths)
    budget = _row_budget(model, "text", T, memory_mb)
    sw = _Sweep(model, "text", tower_inputs["clean"], tower_inputs["corrupted"], samples, noise, sites, heads, metric,
                budget)
    m_clean, m_corr = _baselines(sw)
    first = [p.first_difference if adapter.causal else 0 for p in preps]
    positions = [list(range(f, n)) for f, n in zip(first, lengths, strict=True)]
    out, head_grid = _measure_cells(sw, positions, T, sites=sites, heads=heads, window=window, progress=progress)
    for site, grid in out.items():  # invariant positions of causal towers: exactly zero effect
        rows_with_values = slice(0, None) if site == "resid" else slice(1, None)
        for b, f in enumerate(first):
            grid[b, rows_with_values, :f] = m_corr[b]
    return out, head_grid, m_clean, m_corr


def _cell_rows(cells: list[list[int]], samples: int, row: int, n_rows: int, n_cols: int) -> _Rows:
    example, corrupted, cell, flat = [], [], [], []
    for b, cols in enumerate(cells):
        for s in range(samples):
            for c in cols:
                example.append(b)
                corrupted.append(b * samples + s)
                cell.append(c)
                flat.append(((b * samples + s) * n_rows + row) * n_cols + c)
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return _Rows(t(example), t(corrupted), t(cell), t(flat))


# ----------------------------------------------------------------------------------------
# public entry point


def _as_list(x) -> list | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def _images_for(model: HookedVLM, image, images, n: int) -> Tensor | None:
    if image is not None and images is not None:
        raise ValueError("pass image= (one image for every text) or images= (one per text), not both")
    imgs = images if images is not None else image
    if imgs is None:
        return None
    if not isinstance(imgs, Tensor):
        if model.preprocess is None:
            raise TypeError("images must be preprocessed tensors (B, 3, H, W) for this model")
        imgs = torch.stack([model.preprocess(im) for im in (imgs if isinstance(imgs, (list, tuple)) else [imgs])])
    imgs = model.check_images(imgs)
    if imgs.shape[0] == 1 and n > 1:
        imgs = imgs.expand(n, *imgs.shape[1:])
    if imgs.shape[0] != n:
        raise ValueError(f"got {imgs.shape[0]} images for {n} texts; pass one image, or one per text")
    return imgs


def _build_metric(model: HookedVLM, name: str | None, images: Tensor | None, clean_tok: Tokenized,
                  foils: list[str] | None, candidates: list[list[str]] | None) -> Metric:
    if name is None:
        name = "logit" if images is not None else "cosine"
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {METRICS}")
    if name != "cosine" and images is None:
        raise ValueError(f"metric {name!r} needs images; without images use metric='cosine' (text-only)")
    scale = float(model.logit_scale)
    if name == "cosine":
        return Metric("cosine", unit(model.encode_text(clean_tok)))
    img = unit(model.encode_image(images))
    if name == "logit":
        return Metric("logit", img, scale)
    if name == "margin":
        if foils is None:
            raise ValueError("metric='margin' needs foil= (one foil caption per text)")
        foil_logit = scale * (img * unit(model.encode_text(foils))).sum(-1)
        return Metric("margin", img, scale, offset=foil_logit)
    if candidates is None:
        raise ValueError("metric='option_prob' needs candidates= (other answer options per text)")
    other = torch.stack([scale * img[i] @ unit(model.encode_text(c)).T for i, c in enumerate(candidates)])
    return Metric("option_prob", img, scale, candidates=other)


def _example_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One noise seed per example: ``seed + i`` for an int, else the given sequence (length ``n``)."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} examples; pass one int, or one seed per example")
    return seeds


def _check_common(sites: Sequence[str], window: int, samples: int, corrupt: str, batch_size: int) -> None:
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ValueError(f"unknown sites {bad}; choose from {SITES}")
    if window < 1:
        raise ValueError("window must be >= 1")
    if corrupt == "noise" and samples < 1:
        raise ValueError("samples must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")


def _check_tower_arguments(tower: str, given: dict[str, bool]) -> None:
    """Refuse arguments that belong to the other tower, naming the right one."""
    if tower not in ("text", "vision"):
        raise ValueError(f"unknown tower {tower!r}; choose 'text' or 'vision'")
    text_only = {"clean": "pass the statement as text=", "corrupted": "pass corrupted_image= (or corrupted_images=)",
                 "candidates": "use metric='logit' or 'margin'", "direction": "swap image= and corrupted_image="}
    vision_only = ("corrupted_image", "corrupted_images", "patches", "noise_std")
    for name, used in given.items():
        if tower == "vision" and name in text_only and used:
            raise ValueError(f"{name}= applies to the text tower; for tower='vision' {text_only[name]}")
        if tower == "text" and name in vision_only and used:
            raise ValueError(f"{name}= applies to the vision tower; pass tower='vision'")


def patch(model: HookedVLM, text: str | Sequence[str] | None = None, *, tower: str = "text",
          clean: Sequence[str] | None = None, corrupted: str | Sequence[str | None] | None = None, image=None,
          images=None, corrupted_image=None, corrupted_images=None, patches=None, corrupt: str = "pair",
          direction: str = "restore_negation", sites: Sequence[str] = ("resid",), heads: bool = False,
          metric: str | None = None, foil: str | Sequence[str] | None = None,
          candidates: Sequence[Sequence[str]] | None = None, window: int = 1, samples: int = 10,
          noise_scale: float = 3.0, noise_std: float | None = None, seed: int | Sequence[int] = 0,
          replacement: str = "the", min_denominator: float = 1e-3, batch_size: int = 32, memory_mb: float = 1024,
          progress: bool | None = None) -> CTEResult | list[CTEResult]:
    """Causal tracing of negation in the text tower, or of image evidence in the vision tower.

    Text tower (default). ``text``/``clean``: negated statement(s). ``corrupted``: their
    affirmative counterparts (built from the cue lexicon when omitted or None, ``corrupt="pair"``).
    ``direction``: ``"restore_negation"`` restores negated states into the affirmative run
    (default); ``"restore_affirmation"`` swaps the roles (Quantmeyer et al.'s two directions).
    Returns one :class:`CTEResult` (``values``: (site, L+1, T)) for a single string, else a list.

    Vision tower (``tower="vision"``). ``image``/``images``: clean image(s), preprocessed
    (B, 3, H, W) tensors or PIL images; ``text``: the statement(s) whose image-text logit is
    the metric (default; ``metric="margin"`` with ``foil=``; ``"cosine"`` to the clean image
    embedding without text). ``corrupt="pair"`` with ``corrupted_image(s)=``, or
    ``corrupt="noise"`` on ``patches=`` (0-based row-major indices or a boolean (gh, gw) mask;
    default every patch) with std ``noise_scale`` x the empirical std of the image's patch
    embeddings (or ``noise_std``). Positions: 0 = CLS, 1.. = patches; ``result.grid = (gh, gw)``.
    Returns one result for ``image=`` with at most one text, else a list (see
    :mod:`negtrace.patching.vision`).

    Noise: example ``i`` draws from a generator seeded ``seed + i`` (or ``seed[i]`` for a
    sequence), so results do not depend on batching. ``batch_size`` examples share one sweep;
    restoration rows are chunked to fit ``memory_mb``.
    """
    _check_tower_arguments(tower, {"clean": clean is not None, "corrupted": corrupted is not None,
                                   "candidates": candidates is not None,
                                   "direction": direction != "restore_negation",
                                   "corrupted_image": corrupted_image is not None,
                                   "corrupted_images": corrupted_images is not None,
                                   "patches": patches is not None, "noise_std": noise_std is not None})
    _check_common(sites, window, samples, corrupt, batch_size)
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be a positive number; got {noise_std}")
    if tower == "vision":
        from .vision import patch_vision

        return patch_vision(model, _as_list(text), image=image, images=images, corrupted_image=corrupted_image,
                            corrupted_images=corrupted_images, corrupt=corrupt, patches=patches, sites=tuple(sites),
                            heads=heads, metric=metric, foils=_as_list(foil), window=window, samples=samples,
                            noise_scale=noise_scale, noise_std=noise_std, seed=seed,
                            min_denominator=min_denominator, batch_size=batch_size, memory_mb=memory_mb,
                            progress=progress)
    texts = _as_list(text) if text is not None else _as_list(clean)
    if not texts:
        raise ValueError("no texts to trace: pass a negated statement or clean=[...]")
    single = isinstance(text, str)
    corr = [corrupted] if isinstance(corrupted, str) else (list(corrupted) if corrupted is not None else None)
    if corr is not None and len(corr) != len(texts):
        raise ValueError(f"got {len(corr)} corrupted texts for {len(texts)} clean texts")
    if direction not in ("restore_negation", "restore_affirmation"):
        raise ValueError("direction must be 'restore_negation' or 'restore_affirmation'")
    if direction == "restore_affirmation" and corrupt != "pair":
        raise ValueError("direction='restore_affirmation' needs corrupt='pair' (an affirmative text to restore)")
    foils, cands = _as_list(foil), candidates
    imgs = _images_for(model, image, images, len(texts))
    tokenize = model.tokenizer
    preps = [prepare(tokenize, t, corrupt, corr[i] if corr else None, replacement) for i, t in enumerate(texts)]
    if direction == "restore_affirmation":
        preps = [PreparedText(p.corrupted, p.clean, p.corrupted_ids, p.clean_ids, tokenize([p.corrupted]).tokens[0],
                              p.cue_positions, p.subject_positions) for p in preps]
    seeds = _example_seeds(seed, len(preps))
    results: list[CTEResult] = []
    for start in range(0, len(preps), batch_size):
        sl = slice(start, start + batch_size)
        results += _patch_batch(model, preps[sl], imgs[sl] if imgs is not None else None, corrupt, sites, heads,
                                metric, foils[sl] if foils else None, list(cands[sl]) if cands else None, window,
                                samples if corrupt == "noise" else 1, noise_scale, noise_std, seeds[sl],
                                min_denominator, memory_mb, progress)
    return results[0] if single else results


def _patch_batch(model, preps, imgs, corrupt, sites, heads, metric_name, foils, cands, window, samples, noise_scale,
                 noise_std, seeds, min_denominator, memory_mb, progress) -> list[CTEResult]:
    tokenize = model.tokenizer
    clean_toks = [tokenize([p.clean]) for p in preps]
    pooled = [int(t.pooled_index[0]) for t in clean_toks]
    pad = 0
    clean_tok = _stack_tokens(preps, "clean", pad, pooled).to(model.device)
    corr_tok = _stack_tokens(preps, "corrupted", pad, pooled)
    if samples > 1:
        corr_tok = Tokenized(corr_tok.texts * 1, corr_tok.ids.repeat_interleave(samples, 0),
                             corr_tok.mask.repeat_interleave(samples, 0), corr_tok.tokens, corr_tok.offsets,
                             corr_tok.pooled_index.repeat_interleave(samples, 0))
    corr_tok = corr_tok.to(model.device)
    noise = None
    if corrupt == "noise":
        emb = model.adapters["text"].root.get_submodule(model.adapters["text"].embed_spec.path)
        scale = noise_std if noise_std is not None else noise_scale * embedding_noise_std(emb.weight)
        shape = (1, clean_tok.ids.shape[1], model.adapters["text"].d_model)
        noise = torch.cat([noise_tensor(shape, [p.noise_positions], samples, scale, torch.Generator().manual_seed(sd))
                           for p, sd in zip(preps, seeds, strict=True)]).to(model.device)
    with torch.inference_mode():
        metric = _build_metric(model, metric_name, imgs, clean_tok, foils, cands)
        restored, head_metric, m_clean, m_corr = sweep(
            model, preps, {"clean": clean_tok, "corrupted": corr_tok}, metric, sites=sites, heads=heads,
            window=window, samples=samples, noise=noise, memory_mb=memory_mb, progress=progress)
    out = []
    for b, p in enumerate(preps):
        n = len(p.clean_ids)
        mc, mx = float(m_clean[b]), float(m_corr[b])
        denom = mc - mx
        flagged = not math.isfinite(denom) or abs(denom) < min_denominator
        values = torch.stack([restored[s][b, :, :n] for s in sites])
        values = torch.full_like(values, float("nan")) if flagged else (values - mx) / denom
        hv = None
        if head_metric is not None:
            hv = torch.full_like(head_metric[b], float("nan")) if flagged else (head_metric[b] - mx) / denom
        tok = clean_toks[b]
        roles = generic_roles(tok.tokens[0], tok.offsets[0], p.cue_positions, p.subject_positions, pooled[b])
        out.append(CTEResult(values=values, sites=tuple(sites), labels=list(p.tokens), tower="text",
                             metric=metric.name, corruption=corrupt, clean_metric=mc, corrupted_metric=mx,
                             flagged=flagged, text=p.clean, corrupted_text=p.corrupted,
                             cue_positions=list(p.cue_positions), roles=roles, head_values=hv, window=window))
    return out
