"""``CTEResult``: a causal-tracing-effect map with everything needed to read it.

Layer rows follow the residual stream: row 0 is the embedding (input of block 0), row
``l`` (1..L) is block ``l``'s output for ``resid`` and block ``l``'s own attention / MLP
output for ``attn`` / ``mlp`` (so those have NaN in row 0). ``values`` is

    CTE = [m(x~ with clean state restored) - m(x~)] / [m(x) - m(x~)]

and NaN wherever nothing was measured. A result whose denominator |m(x) - m(x~)| is below
the threshold is ``flagged``: its values stay NaN (never divided blindly) and aggregates
exclude it, counting how many were excluded.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

GENERIC_ROLES = ("start", "before cue", "cue", "first subject", "further subject", "after", "final punct", "end")
QUANTMEYER_ROLES = ("[SOT]", "there", "is/are", "a/some/no", "first subject token", "further subject tokens",
                    ".", "[EOT]")


@dataclass
class CTEResult:
    """One example's CTE map (or, with ``n`` set, an aggregate over examples).

    values: (site, layer, pos) — CTE per restored state. For aggregates ``pos`` indexes roles.
    head_values: (layer, head) CTE of restoring one head's ``z`` at every position, if swept.
    """

    values: Float[Tensor, "site layer pos"]
    sites: tuple[str, ...]
    labels: list[str]  # token strings (single example) or role names (aggregate)
    tower: str = "text"
    metric: str = "logit"
    corruption: str = "pair"
    clean_metric: float = float("nan")
    corrupted_metric: float = float("nan")
    flagged: bool = False
    text: str = ""
    corrupted_text: str = ""
    cue_positions: list[int] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    head_values: Tensor | None = None
    window: int = 1
    grid: tuple[int, int] | None = None  # vision: patch grid (positions 1.. are patches, 0 is CLS)
    # aggregates only
    ci_low: Tensor | None = None
    ci_high: Tensor | None = None
    n: Tensor | None = None  # (pos,) examples contributing to each role
    n_excluded: int = 0

    @property
    def denominator(self) -> float:
        return self.clean_metric - self.corrupted_metric

    @property
    def is_aggregate(self) -> bool:
        return self.n is not None

    @property
    def n_layers(self) -> int:
        return self.values.shape[1] - 1

    def site(self, name: str) -> Float[Tensor, "layer pos"]:
        if name not in self.sites:
            raise KeyError(f"site {name!r} was not swept; this result has {self.sites}")
        return self.values[self.sites.index(name)]

    def per_layer(self, site: str = "resid", stat: str = "mean") -> Float[Tensor, " layer"]:
        """Per-layer summary of one site (the statistic that feeds layer scales).

        ``mean``/``sum``/``std``/``max``: over positions (NaN ignored); ``cue``: mean over cue
        positions; ``pooled``: the pooled position (last label: EOT, or CLS for vision/BERT
        aggregates as labelled).
        """
        grid = self.site(site)
        if stat == "cue":
            idx = self.cue_positions or [i for i, r in enumerate(self.labels) if r in ("cue", "a/some/no")]
            if not idx:
                raise ValueError("no cue positions in this result")
            grid = grid[:, idx]
            stat = "mean"
        if stat == "pooled":
            return grid[:, self._pooled_position()]
        arr = grid.numpy()
        with np.errstate(all="ignore"), _quiet_nan():
            out = {"mean": np.nanmean, "sum": np.nansum, "std": np.nanstd, "max": np.nanmax}[stat](arr, axis=1)
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _pooled_position(self) -> int:
        if self.tower == "vision":
            return 0
        for name in ("end", "[EOT]"):
            if name in self.roles:
                return self.roles.index(name)
            if name in self.labels:
                return self.labels.index(name)
        return len(self.labels) - 1

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``path.safetensors`` (tensors) and ``path.json`` (metadata), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.contiguous() for k, v in self._tensors().items()}
        _atomic(path.with_suffix(".safetensors"), lambda p: save_file(tensors, p))
        meta = self.metadata()
        _atomic(path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=2)))

    def _tensors(self) -> dict[str, Tensor]:
        out = {"values": self.values.float()}
        for name in ("head_values", "ci_low", "ci_high", "n"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.float()
        return out

    def metadata(self) -> dict:
        skip = {"values", "head_values", "ci_low", "ci_high", "n"}
        meta = {k: v for k, v in asdict(self).items() if k not in skip}
        meta["sites"] = list(self.sites)
        meta["grid"] = list(self.grid) if self.grid else None
        return meta

    @classmethod
    def load(cls, path: str | Path) -> CTEResult:
        from safetensors.torch import load_file

        path = Path(path)
        tensors = load_file(str(path.with_suffix(".safetensors")))
        meta = json.loads(path.with_suffix(".json").read_text())
        known = {f.name for f in fields(cls)}
        meta = {k: v for k, v in meta.items() if k in known}  # the JSON may carry summaries too
        meta["sites"] = tuple(meta["sites"])
        meta["grid"] = tuple(meta["grid"]) if meta.get("grid") else None
        return cls(**meta, **tensors)


class _quiet_nan:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _role_table(result: CTEResult, roles: tuple[str, ...]) -> Tensor:
    """(site, layer, role) means of one example; NaN where the example has no such role."""
    v = result.values
    out = torch.full((v.shape[0], v.shape[1], len(roles)), float("nan"))
    for j, role in enumerate(roles):
        idx = [i for i, r in enumerate(result.roles) if r == role]
        if idx:
            out[..., j] = v[..., idx].nanmean(-1) if len(idx) > 1 else v[..., idx[0]]
    return out


def aggregate(results: list[CTEResult], scheme: str = "generic", n_boot: int = 1000, ci: float = 0.95,
              seed: int = 0) -> CTEResult:
    """Role-aligned mean over examples with percentile-bootstrap confidence intervals.

    ``scheme="generic"`` uses :data:`GENERIC_ROLES`; ``"quantmeyer"`` the 8 rows of Quantmeyer
    et al. 2024 (template "there is/are a/some/no X."), where the further-subject row is the
    mean over those tokens within an example. Vision results align by position instead (roles
    ``CLS``, ``p(r,c)``), so they must share one patch grid. Flagged examples (tiny
    denominators) are excluded and counted in ``n_excluded``.
    """
    if not results:
        raise ValueError("aggregate() got no results")
    roles = {"generic": GENERIC_ROLES, "quantmeyer": QUANTMEYER_ROLES}.get(scheme)
    if roles is None:
        raise ValueError(f"unknown role scheme {scheme!r}; use 'generic' or 'quantmeyer'")
    kept = [r for r in results if not r.flagged]
    first = results[0]
    for r in results:
        if r.sites != first.sites or r.values.shape[:2] != first.values.shape[:2] or r.tower != first.tower:
            raise ValueError("results to aggregate must share sites, layers and tower")
    if first.tower == "vision":  # roles are CLS and patch coordinates: images of one grid align position by position
        grids = sorted({tuple(r.grid) if r.grid else None for r in results}, key=str)
        if len(grids) != 1 or grids[0] is None:
            raise ValueError(f"vision results to aggregate must share one patch grid; got {grids}")
        roles, scheme = tuple(first.roles), "generic"
    if not kept:
        raise ValueError(f"all {len(results)} examples were flagged (|m(x) - m(x~)| too small); nothing to aggregate")
    if scheme == "quantmeyer":
        from .roles import quantmeyer_roles

        kept = [_with_roles(r, quantmeyer_roles(r.labels)) for r in kept]
    table = torch.stack([_role_table(r, roles) for r in kept])  # (N, site, layer, role)
    mean = table.nanmean(0)
    arr = table.numpy()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    with _quiet_nan():
        boots = np.nanmean(arr[idx], axis=1)  # (B, site, layer, role)
        lo = np.nanpercentile(boots, 100 * (1 - ci) / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 + ci) / 2, axis=0)
    n = (~torch.isnan(table)).any(dim=(1, 2)).sum(0)
    agg = CTEResult(values=mean, sites=first.sites, labels=list(roles), tower=first.tower, metric=first.metric,
                    corruption=first.corruption, roles=list(roles), window=first.window,
                    clean_metric=float(np.mean([r.clean_metric for r in kept])),
                    corrupted_metric=float(np.mean([r.corrupted_metric for r in kept])),
                    ci_low=torch.from_numpy(lo.astype(np.float32)), ci_high=torch.from_numpy(hi.astype(np.float32)),
                    n=n, n_excluded=len(results) - len(kept), grid=first.grid)
    heads = [r.head_values for r in kept if r.head_values is not None]
    if len(heads) == len(kept):
        agg.head_values = torch.stack(heads).nanmean(0)
    return agg


def _with_roles(result: CTEResult, roles: list[str]) -> CTEResult:
    from dataclasses import replace

    return replace(result, roles=roles)
