"""Selective fine-tuning guided by causal tracing (NAST, Abbasi et al. 2026).

    scales.py     CTE map -> per-layer scales (:func:`layer_scales`, :class:`LayerScales`)
    groups.py     per-layer parameter groups of both towers, measured from the adapters
    selective.py  mechanisms: per-group learning rates, per-layer LoRA, gradient hooks
    losses.py     CLIP loss with negated hard negatives (NegCLIP), MCQ loss (NegBench)
    data.py       training examples from polarity JSONL, phantom datasets, caption tables
    loop.py       the training loop and :func:`selective_finetune`
    cli.py        ``negtrace finetune``

The public entry points are exported lazily from :mod:`negtrace`.
"""
