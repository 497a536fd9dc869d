"""Per-layer fine-tuning scales from a causal-tracing map (NAST, Abbasi et al. 2026).

Row convention (see :mod:`negtrace.patching.result`): a CTE map has ``L + 1`` layer rows.
Row 0 is the embedding (the residual state entering block 0); row ``r`` (1..L) is, for
``resid``, the state block ``r - 1`` wrote (the state entering block ``r``), and for
``attn`` / ``mlp`` the output of block ``r - 1``'s own attention / MLP (row 0 is NaN). So

    row 0      -> ``{tower}.embed``          (only with ``include_embed=True``, resid only)
    row r >= 1 -> ``{tower}.blocks.{r - 1}``  (0-based, as in hook names and ``adapter.blocks()``)

Statistic per layer row (over the map's position axis; NaN cells ignored), via
:meth:`CTEResult.per_layer`:

    ``mean``    mean over positions (or roles, for aggregates)
    ``cue``     mean over the cue positions (the ``cue`` / ``a/some/no`` role of aggregates)
    ``pooled``  the pooled position (EOT for causal text towers, CLS for vision / BERT)
    ``sum``     sum over positions
    ``std``     standard deviation over positions
    ``max``     largest value over positions

Negative statistics (restoring pushes away from the clean metric) carry no evidence that a
layer processes negation: ``negative="clip"`` (default) sets them to 0, ``"abs"`` uses |v|.

Policies, applied per tower to the non-negative statistics v_l of its L' scaled rows:

    ``max``      s_l = v_l / max v                       (largest scale 1)
    ``sum``      s_l = L' v_l / sum v                    (mean scale 1: same lr budget as uniform)
    ``softmax``  s_l = L' softmax(v / temperature)_l     (mean scale 1; temperature -> inf: uniform)
    ``rank``     s_l = rank(v_l) / L'                     (1/L' .. 1; ties share their mean rank)

then ``s_l = clip(s_l, floor, cap)``. Controls: ``control="uniform"`` gives every scaled
group 1.0 (same groups, no CTE information); ``control="shuffled"`` permutes a tower's scales
across its layers with a seeded generator (same values, wrong layers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..patching.result import CTEResult

Policy = Literal["max", "sum", "softmax", "rank"]
Stat = Literal["mean", "cue", "pooled", "sum", "std", "max"]
POLICIES = ("max", "sum", "softmax", "rank")
STATS = ("mean", "cue", "pooled", "sum", "std", "max")
CONTROLS = (None, "uniform", "shuffled")

__all__ = ["LayerScales", "layer_scales", "POLICIES", "STATS"]


def _block_index(name: str) -> tuple[str, int]:
    tower, kind, *rest = name.split(".")
    return tower, (int(rest[0]) if kind == "blocks" and rest else -1)


@dataclass
class LayerScales(Mapping[str, float]):
    """Group name (``"text.blocks.3"``, ``"text.embed"``) -> non-negative finite scale.

    A read-only mapping, so ``dict(scales)`` and ``scales["text.blocks.3"]`` work. ``meta``
    records how the scales were made (policy, statistic, site, ...), and is saved with them.
    """

    scales: dict[str, float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scales = {str(k): float(v) for k, v in self.scales.items()}
        check_scales(self.scales)

    # -- Mapping --------------------------------------------------------------------------
    def __getitem__(self, key: str) -> float:
        return self.scales[key]

    def __iter__(self):
        return iter(self.scales)

    def __len__(self) -> int:
        return len(self.scales)

    # -- controls -------------------------------------------------------------------------
    def uniform(self) -> LayerScales:
        """The same groups, every scale 1.0."""
        return LayerScales({k: 1.0 for k in self.scales}, {**self.meta, "control": "uniform"})

    def shuffled(self, seed: int = 0) -> LayerScales:
        """Each tower's scales permuted across its groups (seeded ``numpy`` generator)."""
        rng = np.random.default_rng(seed)
        out: dict[str, float] = {}
        for tower in dict.fromkeys(k.split(".")[0] for k in self.scales):
            names = [k for k in self.scales if k.split(".")[0] == tower]
            values = [self.scales[k] for k in names]
            perm = rng.permutation(len(names))
            out.update({names[i]: values[j] for i, j in enumerate(perm)})
        return LayerScales(out, {**self.meta, "control": "shuffled", "shuffle_seed": seed})

    # -- I/O ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"scales": dict(self.scales), "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerScales:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("scales"), dict):
            raise ValueError(f"{path}: not a layer-scales file (expected {{'scales': {{group: scale}}, 'meta': ...}})")
        return cls(data["scales"], data.get("meta", {}))

    # -- display --------------------------------------------------------------------------
    def to_table(self) -> str:
        """Plain-text table: group, scale, and a bar proportional to the scale."""
        if not self.scales:
            return "(no scales)"
        top = max(self.scales.values()) or 1.0
        width = max(len(k) for k in self.scales)
        lines = [f"{'group':<{width}}  scale", f"{'-' * width}  ------"]
        for k, v in sorted(self.scales.items(), key=lambda kv: _sort_key(kv[0])):
            lines.append(f"{k:<{width}}  {v:6.3f}  {'#' * round(20 * v / top)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        how = ", ".join(f"{k}={v}" for k, v in self.meta.items() if k in ("policy", "stat", "site", "control"))
        return f"LayerScales({how})\n{self.to_table()}"

    def figure(self, title: str | None = None):
        """A plotly bar chart of the scales per group, one colour per tower (negtrace.plot style)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for tower, color in (("text", "#b2182b"), ("vision", "#2166ac")):
            names = sorted((k for k in self.scales if k.startswith(tower + ".")), key=_sort_key)
            if names:
                fig.add_bar(x=names, y=[self.scales[k] for k in names], name=tower, marker_color=color,
                            hovertemplate="%{x}: %{y:.3f}<extra></extra>")
        fig.update_xaxes(title_text="parameter group", type="category")
        fig.update_yaxes(title_text="learning-rate scale", rangemode="tozero")
        how = ", ".join(f"{k}={v}" for k, v in self.meta.items() if k in ("policy", "stat", "site", "control"))
        fig.update_layout(title=dict(text=title or f"Layer scales ({how})"), plot_bgcolor="white")
        return fig


def _sort_key(name: str) -> tuple:
    tower, idx = _block_index(name)
    kind = name.split(".")[1] if "." in name else ""
    order = {"embed": 0, "blocks": 1, "final": 2}.get(kind, 3)
    return (tower, order, idx, name)


def check_scales(scales: Mapping[str, float]) -> None:
    """Raise a ``ValueError`` naming every negative, NaN or infinite scale."""
    bad = {k: v for k, v in scales.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"scales must be finite and >= 0; got {bad}. Use floor= to keep a minimum, or 0 to freeze "
                         "a group")


def _policy(v: np.ndarray, policy: str, temperature: float) -> np.ndarray:
    n = len(v)
    if policy == "max":
        top = v.max()
        return v / top if top > 0 else np.ones(n)
    if policy == "sum":
        total = v.sum()
        return n * v / total if total > 0 else np.ones(n)
    if policy == "softmax":
        z = v / temperature
        z = np.exp(z - z.max())
        return n * z / z.sum()
    if policy == "rank":
        order = v.argsort(kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(1, n + 1)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            ranks[tie] = ranks[tie].mean()
        return ranks / n
    raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")


def layer_scales(results: CTEResult | Iterable[CTEResult], policy: Policy = "max", *, stat: Stat = "mean",
                 site: str = "resid", temperature: float = 1.0, floor: float = 0.0, cap: float = math.inf,
                 include_embed: bool = False, negative: Literal["clip", "abs"] = "clip",
                 control: Literal["uniform", "shuffled"] | None = None, seed: int = 0) -> LayerScales:
    """Per-layer scales from one CTE map per tower (usually :func:`negtrace.aggregate` results).

    See the module docstring for the row -> group mapping, statistics and policies. Returns a
    :class:`LayerScales` over ``{tower}.blocks.{l}`` (and ``{tower}.embed`` with
    ``include_embed``) for each tower given. Groups absent from the result (other tower,
    final norm/projection) are handled by :func:`negtrace.param_groups`' ``unscaled`` rule.
    """
    if isinstance(results, CTEResult):
        results = [results]
    results = list(results)
    if not results:
        raise ValueError("layer_scales() got no CTE results")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")
    if stat not in STATS:
        raise ValueError(f"unknown statistic {stat!r}; use one of {STATS}")
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; use 'uniform', 'shuffled' or None")
    if negative not in ("clip", "abs"):
        raise ValueError(f"negative must be 'clip' or 'abs', got {negative!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not (0 <= floor <= cap) or math.isnan(floor) or math.isnan(cap):
        raise ValueError(f"need 0 <= floor <= cap, got floor={floor}, cap={cap}")
    towers = [r.tower for r in results]
    if len(set(towers)) != len(towers):
        raise ValueError(f"one CTE result per tower, got towers {towers}; aggregate same-tower results first "
                         "with negtrace.aggregate")
    out: dict[str, float] = {}
    for res in results:
        row = res.per_layer(site, stat).double().numpy()
        names = [f"{res.tower}.embed"] + [f"{res.tower}.blocks.{r - 1}" for r in range(1, len(row))]
        keep = [r for r in range(len(row)) if (r > 0 or include_embed) and np.isfinite(row[r])]
        if not keep:
            raise ValueError(f"the {res.tower} CTE map has no finite {stat!r} values for site {site!r}")
        v = row[keep]
        v = np.abs(v) if negative == "abs" else np.clip(v, 0, None)
        s = np.clip(_policy(v, policy, temperature), floor, cap)
        out.update({names[r]: float(x) for r, x in zip(keep, s, strict=True)})
    meta = {"policy": policy, "stat": stat, "site": site, "temperature": temperature, "floor": floor,
            "cap": cap if math.isfinite(cap) else None, "include_embed": include_embed, "negative": negative,
            "towers": towers}
    scales = LayerScales(out, meta)
    if control == "uniform":
        return scales.uniform()
    if control == "shuffled":
        return scales.shuffled(seed)
    return scales

