"""negtrace: find where medical vision-language models process negation, and fix them.

The public API is imported lazily so that ``import negtrace`` stays fast (torch,
transformers and TransformerLens load on first use)::

    import negtrace as nt
    model = nt.load("phantom")
    res = nt.patch(model, "No pleural effusion.", image=img)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load": "negtrace.models.zoo",
    "wrap": "negtrace.models.zoo",
    "HookedVLM": "negtrace.models.hooked",
    "hook_name": "negtrace.models.sites",
    "find_cues": "negtrace.negation.cues",
    "patch": "negtrace.patching.engine",
    "patch_dataset": "negtrace.patching.distributed",
    "CTEResult": "negtrace.patching.result",
    "aggregate": "negtrace.patching.result",
    "heatmap": "negtrace.plot",
    "patch_grid": "negtrace.plot",
    "save_figure": "negtrace.plot",
    "layer_scales": "negtrace.finetune.scales",
    "LayerScales": "negtrace.finetune.scales",
    "param_groups": "negtrace.finetune.selective",
    "selective_finetune": "negtrace.finetune.loop",
    "load_finetuned": "negtrace.finetune.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'negtrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .models.hooked import HookedVLM  # noqa: F401
    from .models.sites import hook_name  # noqa: F401
    from .models.zoo import load, wrap  # noqa: F401
    from .negation.cues import find_cues  # noqa: F401
