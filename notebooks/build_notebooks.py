"""Write the project's notebooks (``notebooks/*.ipynb``) from the cell lists below.

The ``.ipynb`` files are what is committed and what ``tests/test_notebooks.py`` executes;
this script is how they are edited. Setup and use (from the repository root):

    python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"
    python notebooks/build_notebooks.py          # rewrites notebooks/01_*, 02_* and 03_*.ipynb
    NEGTRACE_NB_SMALL=1 python -m pytest tests/test_notebooks.py

Notebooks are written without outputs. Every notebook's first code cell is tagged
``parameters`` (papermill's convention) and reads ``NEGTRACE_NB_SMALL`` (``1``: reduced sizes,
for CI) and ``NEGTRACE_NB_OUT`` (output folder) from the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

LOAD_MODEL = '''\
import negtrace as nt

try:
    model = nt.load("phantom")
    MODEL_IS_RANDOM = False
except (ImportError, FileNotFoundError) as exc:  # not shipped yet; a corrupted file still raises
    import warnings

    from negtrace.models.random_models import tiny_open_clip

    warnings.warn(f"the embedded phantom model is unavailable ({type(exc).__name__}: {exc}); using a "
                  "RANDOM-INITIALISED tiny CLIP instead: every number below exercises the pipeline, none of "
                  "them says anything about negation", stacklevel=1)
    print("WARNING: random-initialised tiny CLIP in use (embedded phantom model unavailable)")
    model = tiny_open_clip(seed=SEED)
    MODEL_IS_RANDOM = True
MODEL_NAME = "phantom" if not MODEL_IS_RANDOM else "random tiny CLIP"
text_adapter = model.adapters["text"]
print(f"model: {MODEL_NAME}; text tower: {text_adapter.n_layers} layers x {text_adapter.n_heads} heads, "
      f"{'causal' if text_adapter.causal else 'bidirectional'}; images: {model.image_size}")'''

LABEL_IMPORTS = ("import csv", "import json", "from negtrace.data.findings import FINDINGS",
                 "from negtrace.data.phantom import CHEXPERT_COLUMNS, PhantomSpec, label_row")

COMPLETE_LABELS = '''\
def complete_label_csv(attributes_path, out_path):
    """A CheXpert-format CSV where every finding the phantom does not have is labelled 0.

    The dataset's own labels_*.csv imitates a report labeler: a finding is 0 only when the
    report negates it, otherwise blank. The phantom world knows the full truth, so here every
    absent finding is a certain 0 (its attributes JSONL lists every present finding)."""
    rows = []
    for line in Path(attributes_path).read_text().splitlines():
        record = json.loads(line)
        spec = PhantomSpec.from_dict(record["spec"])
        rows.append(label_row(record["path"], spec, [f for f in FINDINGS if not spec.has(f)]))
    with open(out_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CHEXPERT_COLUMNS, lineterminator="\\n")
        writer.writeheader()
        writer.writerows(rows)
    return out_path'''


def parameters(extra: str) -> str:
    return f'''\
# Parameters. NEGTRACE_NB_SMALL=1 (set by tests/test_notebooks.py) selects reduced sizes.
import os
from pathlib import Path

SMALL = os.environ.get("NEGTRACE_NB_SMALL", "0") == "1"
OUT = Path(os.environ.get("NEGTRACE_NB_OUT", "runs/notebooks"))
SEED = 0
{extra}
OUT.mkdir(parents=True, exist_ok=True)
print(f"SMALL={{SMALL}}, outputs in {{OUT.resolve()}}")'''


def imports(*extra: str) -> str:
    """An import block (stdlib first, then negtrace, sorted) for a cell that uses complete_label_csv."""
    lines = sorted(set(LABEL_IMPORTS + extra))
    std = [x for x in lines if x.startswith("import ")]
    ours = [x for x in lines if x.startswith("from ")]
    return "\n".join(std) + "\n\n" + "\n".join(ours) + "\n\n\n"


def _cells(spec: list[tuple[str, str]]):
    cells = []
    for i, (kind, source) in enumerate(spec):
        if kind == "md":
            cells.append(new_markdown_cell(source.strip("\n")))
        else:
            cell = new_code_cell(source.strip("\n"))
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            cells.append(cell)
        cells[-1].id = f"cell-{i:02d}"  # stable ids: regenerating gives no spurious diffs
    return cells


# ------------------------------------------------------------------------------------------
# 02: negation benchmarks
# ------------------------------------------------------------------------------------------
NB02 = [
    ("md", """
# Negation benchmarks on the phantom world

Does a vision-language model read *"no pleural effusion"* differently from *"pleural effusion"*?
This notebook measures it with two benchmarks built from label files, on procedurally rendered
chest-radiograph phantoms (`negtrace.data.phantom`), so it needs no data download:

1. **Polarity MCQ** (`negtrace.data.polarity`, after NAST/NegBench): four statements per image
   about three findings; each item is worded twice, once with negations ("no effusion") and once
   with the normal-anatomy counterpart ("sharp costophrenic angles"). A model that understands
   negation answers both wordings equally well; the **gap** (affirmative minus negated accuracy)
   measures how much negation alone costs.
2. **Contextual claims** (`negtrace.data.contextual`): rank a true claim about one finding among
   false ones, including negations of the finding, its location or its severity.

The same benchmarks are then built from the real CheXpert label file when `torchxrayvision` (which
ships it) is installed.
"""),
    ("params", parameters('''\
N_TEST = 120 if SMALL else 2000          # phantom test images
IMAGE_SIZE = 64 if SMALL else 224        # rendered size; the model's preprocess resizes
N_BOOT = 200 if SMALL else 2000          # bootstrap resamples for confidence intervals
N_REAL_ITEMS = 200 if SMALL else 3000    # polarity items drawn from the real CheXpert labels
OUT = OUT / "02_negation_benchmarks"''')),
    ("md", """
## The model

`negtrace.load("phantom")` is the small CLIP trained on the phantom world and shipped with negtrace.
If it is not installed yet, a random-initialised tiny CLIP takes its place, with a warning: the
pipeline then runs for real, but its accuracies are those of an untrained model (around chance).
"""),
    ("code", LOAD_MODEL),
    ("md", """
## A phantom test set

`build_phantom_dataset` renders CheXpert-style studies: PNGs, a `labels_test.csv` in CheXpert's
column layout, and `attributes_test.jsonl` with every finding's side, zone and severity. Finding
prevalences and co-occurrences follow the CheXpert training labels.
"""),
    ("code", '''\
from negtrace.data.phantom import build_phantom_dataset

summary = build_phantom_dataset(OUT / "phantoms", n_train=0, n_val=0, n_test=N_TEST, size=IMAGE_SIZE,
                                seed=SEED, progress=False)
print(f"{summary.counts['test']} test images ({summary.rendered} rendered, {summary.skipped} already there) "
      f"in {summary.seconds:.1f} s")'''),
    ("md", """
The dataset's own label file imitates a report labeler: a finding is labelled 0 only when the
report negates it, otherwise it is blank, as in CheXpert. The polarity benchmark needs at least
three *certain* absences per study, which few such rows have. The phantom world knows the full truth,
so we write a complete label file where every absent finding is a certain 0.
"""),
    ("code", imports("from negtrace.data.labels import read_labels") + COMPLETE_LABELS + '''


complete_csv = complete_label_csv(OUT / "phantoms" / "attributes_test.jsonl", OUT / "labels_test_complete.csv")
table = read_labels(complete_csv)
report_table = read_labels(OUT / "phantoms" / "labels_test.csv")
print(f"{len(table)} studies; certain absences per study: report-style labels "
      f"{(report_table.findings == 0).sum(1).mean():.1f}, complete labels {(table.findings == 0).sum(1).mean():.1f}")'''),
    ("md", "## Building the benchmarks"),
    ("code", '''\
from negtrace.data.contextual import build_contextual, read_attributes
from negtrace.data.polarity import build_polarity

polarity = build_polarity(table, seed=SEED)
attributes = read_attributes(OUT / "phantoms" / "attributes_test.jsonl")
contextual = build_contextual(table, attributes, attributes_complete=True, seed=SEED,
                              n_items=min(N_TEST, 1000))
print(f"polarity: {polarity.stats['n_items']} items from {polarity.stats['n_eligible']} eligible of "
      f"{polarity.stats['n_studies']} studies; patterns {polarity.stats['pattern_counts']}")
print(f"contextual: {contextual.stats['n_items']} items; target kinds {contextual.stats['target_kinds']}")
item = polarity.items[0]
print("\\nexample item:", item.question)
for k, (neg, aff) in enumerate(zip(item.options_negated, item.options_affirmative, strict=True)):
    print(f"  {'*' if k == item.answer else ' '} negated: {neg!r}\\n    affirmative: {aff!r}")'''),
    ("md", """
## Evaluation

Every option is scored by the cosine similarity of its text embedding with the image embedding; an
item counts as correct when the true option scores strictly highest (ties are wrong, so a constant
model scores 0, not 25%). Confidence intervals are percentile bootstraps over items.
"""),
    ("code", '''\
from negtrace.evaluate import evaluate_contextual, evaluate_polarity

images = OUT / "phantoms"
pol = evaluate_polarity(model, polarity.items, image_root=images, n_boot=N_BOOT, seed=SEED, progress=False)
ctx = evaluate_contextual(model, contextual.items, image_root=images, n_boot=N_BOOT, seed=SEED, progress=False)


def fmt(entry):
    return f"{entry['value']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}] (n={entry['n']})"


print("polarity accuracy, negated wording:    ", fmt(pol["accuracy_negated"]))
print("polarity accuracy, affirmative wording:", fmt(pol["accuracy_affirmative"]))
print("gap (affirmative - negated):           ", fmt(pol["gap"]))
print("contextual recall@1:                   ", fmt(ctx["retrieval"]["recall@1"]))
print("contextual claim ranking (pairs):      ", fmt(ctx["ranking"]["pair_accuracy"]))'''),
    ("md", """
## Figure 1: where negation costs accuracy, finding by finding

Left: accuracy per finding (items that mention the finding) in the negated and the affirmative
wording. Right: the gap with its 95% bootstrap interval. A gap above zero means the model answers
the same question worse when absences are stated with negation words. Findings with few items have
wide intervals; read those as "not measured", not as "no gap". The dotted line is chance (one in
four). With the random fallback model these bars and gaps are noise: they show the figure, not a
finding.
"""),
    ("code", '''\
import plotly.graph_objects as go
from plotly.subplots import make_subplots

findings = sorted(pol["per_finding"], key=lambda f: pol["per_finding"][f]["gap"]["value"])
per = [pol["per_finding"][f] for f in findings]
labels = [f"{f} (n={p['gap']['n']})" for f, p in zip(findings, per, strict=True)]


def bars(name, key, color):
    vals = [p[key]["value"] for p in per]
    return go.Bar(name=name, y=labels, x=vals, orientation="h", marker_color=color,
                  error_x=dict(type="data", symmetric=False, array=[p[key]["ci"][1] - p[key]["value"] for p in per],
                               arrayminus=[p[key]["value"] - p[key]["ci"][0] for p in per]))


fig_findings = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.03,
                             subplot_titles=("accuracy per wording", "gap: affirmative - negated"))
fig_findings.add_trace(bars("negated wording", "accuracy_negated", "#d62728"), row=1, col=1)
fig_findings.add_trace(bars("affirmative wording", "accuracy_affirmative", "#1f77b4"), row=1, col=1)
gaps = [p["gap"] for p in per]
fig_findings.add_trace(go.Scatter(
    x=[g["value"] for g in gaps], y=labels, mode="markers", marker=dict(color="black", size=8), name="gap",
    error_x=dict(type="data", symmetric=False, array=[g["ci"][1] - g["value"] for g in gaps],
                 arrayminus=[g["value"] - g["ci"][0] for g in gaps])), row=1, col=2)
fig_findings.add_vline(x=pol["chance"], line_dash="dot", row=1, col=1)
fig_findings.add_vline(x=0, line_color="gray", row=1, col=2)
fig_findings.update_layout(barmode="group", height=160 + 34 * len(findings), width=980,
                           title=f"Polarity MCQ per finding — {MODEL_NAME}" + (" (RANDOM weights)" if MODEL_IS_RANDOM else ""))
fig_findings.update_xaxes(range=[0, 1], title_text="accuracy", row=1, col=1)
fig_findings.update_xaxes(title_text="accuracy gap", row=1, col=2)
fig_findings'''),
    ("md", """
## Figure 2: which negation patterns hurt

The same gap, split by the negation pattern the item was worded with ("no X", "without X",
"X absent", "A and B, but not C", ...). If a text encoder reads a sentence nearly as a bag of words,
patterns that put the cue after the finding or far from it ("X not seen", "but not C") should cost
most; this figure is where that expectation is tested, not assumed.
"""),
    ("code", '''\
patterns = sorted(pol["per_pattern"], key=lambda p: pol["per_pattern"][p]["gap"]["value"])
pg = [pol["per_pattern"][p]["gap"] for p in patterns]
fig_patterns = go.Figure(go.Bar(
    x=[f"{p} (n={g['n']})" for p, g in zip(patterns, pg, strict=True)], y=[g["value"] for g in pg], marker_color="#7f7f7f",
    error_y=dict(type="data", symmetric=False, array=[g["ci"][1] - g["value"] for g in pg],
                 arrayminus=[g["value"] - g["ci"][0] for g in pg])))
fig_patterns.add_hline(y=0, line_color="black")
fig_patterns.update_layout(title="Accuracy gap (affirmative - negated) per negation pattern",
                           yaxis_title="accuracy gap", width=800, height=420)
fig_patterns'''),
    ("md", """
## Figure 3: contextual claims

Recall@k of the true claim among all candidates, and claim ranking: how often the true claim beats
each false variant of the same finding, split by what the variant negates (the finding, its
location, its severity). A model that ignores negation scores "no left pleural effusion" and "left
pleural effusion" alike, so it has no systematic way to beat finding-level negation variants. Do not
read 0.5 as the no-skill line, though: an encoder can prefer shorter or longer claims for reasons
unrelated to meaning (even a random one does), so compare the variant kinds with each other.
"""),
    ("code", '''\
from negtrace.evaluate import contextual_figure

fig_contextual = contextual_figure(ctx, title="Contextual claims — " + MODEL_NAME)
fig_contextual'''),
    ("md", """
## The real CheXpert label file

`torchxrayvision` ships CheXpert's `train.csv` (labels only, no images). When it is installed we
build the polarity benchmark from it exactly as from the phantom labels, and show what the items look
like. The images are not bundled, so nothing is evaluated here; with the CheXpert images on disk the
same items are evaluated by
`negtrace eval --model ... --benchmark polarity.jsonl --images /data/CheXpert-v1.0-small`.
Without `torchxrayvision` (`pip install -e ".[real-data]"`), this section says so and is skipped.
"""),
    ("code", '''\
try:
    import torchxrayvision
except ImportError:
    real = None
    print("torchxrayvision is not installed: skipping the real CheXpert label file "
          "(pip install -e '.[real-data]' to include it)")
else:
    chexpert_csv = Path(torchxrayvision.__file__).parent / "data" / "chexpert_train.csv.gz"
    real = build_polarity(read_labels(chexpert_csv), seed=SEED, n_items=N_REAL_ITEMS)
    print(f"CheXpert train.csv: {real.stats['n_studies']} studies, {real.stats['n_eligible']} eligible for "
          f"the polarity benchmark, {real.stats['n_items']} items drawn")
    counts = {}
    for it in real.items:
        for f in it.findings:
            counts[f] = counts.get(f, 0) + 1
    print("findings used:", dict(sorted(counts.items(), key=lambda kv: -kv[1])))
    print("example negated options:", real.items[0].options_negated)'''),
    ("md", """
## What these numbers are

* Accuracies are on phantom images with a model trained on phantom images (or a random model): they
  show how the benchmarks behave, not how a clinical model performs on real radiographs.
* The gap isolates wording: the two forms of an item share image, findings and answer, and differ
  only in how absences are stated. It does not separate *reading* negation from *grounding* the
  normal-anatomy phrase in the image.
* The final cell checks that every quantity shown above exists and is finite.
"""),
    ("code", '''\
import math

key_quantities = {
    "accuracy_negated": pol["accuracy_negated"]["value"],
    "accuracy_affirmative": pol["accuracy_affirmative"]["value"],
    "gap": pol["gap"]["value"],
    "recall@1": ctx["retrieval"]["recall@1"]["value"],
    "pair_accuracy": ctx["ranking"]["pair_accuracy"]["value"],
    **{f"gap[{f}]": pol["per_finding"][f]["gap"]["value"] for f in findings},
    **{f"gap[pattern {p}]": pol["per_pattern"][p]["gap"]["value"] for p in patterns},
}
assert polarity.stats["n_items"] > 0 and contextual.stats["n_items"] > 0
assert len(fig_findings.data) == 3 and len(fig_findings.data[0].x) == len(findings) > 0
bad = {k: v for k, v in key_quantities.items() if not math.isfinite(v)}
assert not bad, f"non-finite quantities: {bad}"
for name in ("accuracy_negated", "accuracy_affirmative", "recall@1", "pair_accuracy"):
    assert 0.0 <= key_quantities[name] <= 1.0, (name, key_quantities[name])
if real is not None:
    assert real.stats["n_items"] == min(N_REAL_ITEMS, real.stats["n_eligible"])
print(f"{len(key_quantities)} key quantities, all finite")'''),
]

# ------------------------------------------------------------------------------------------
# 01: where is negation
# ------------------------------------------------------------------------------------------
NB01 = [
    ("md", """
# Where is negation processed?

Causal tracing of negation in the text tower of a CLIP-style model. We take a negated statement
(*"there is no pleural effusion."*, the **clean** run) and its affirmative counterpart
(*"there is a pleural effusion."*, the **corrupted** run), run both against the same image, and then
copy ("restore") single internal states of the clean run into the corrupted run, one layer and one
token position at a time. The causal tracing effect of a state is

$$\\mathrm{CTE}(\\text{site}, l, p) = \\frac{m(\\tilde x \\text{ with } h_{l,p} \\text{ restored}) - m(\\tilde x)}{m(x) - m(\\tilde x)}$$

with $m$ the image–text logit. CTE = 1: that one state carries everything that makes the negated
statement score differently from the affirmative one; CTE = 0: it carries nothing of it.

The model is negtrace's embedded phantom CLIP (`negtrace.load("phantom")`, trained on procedural
chest-radiograph phantoms); if it is not installed, a random-initialised tiny CLIP stands in, with a
warning, and every effect below is then meaningless (the pipeline still runs for real).
"""),
    ("params", parameters('''\
N_IMAGES = 40 if SMALL else 300          # phantom images the tracing pairs are drawn from
FINDINGS_TRACED = (["Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly"] if SMALL
                   else None)            # None: all 13 CheXpert findings
TEMPLATES = ["there_is_no", "without"] if SMALL else ["there_is_no", "no_evidence", "without", "is_absent", "not_seen"]
IMAGES_PER_FINDING = 2 if SMALL else 4   # each pair is traced on this many images without the finding
N_BOOT = 200 if SMALL else 2000
OUT = OUT / "01_where_is_negation"''')),
    ("code", LOAD_MODEL),
    ("md", """
## A negated and an affirmative statement against a phantom

`render_pair` draws one phantom patient twice: with a left pleural effusion and without it, identical
everywhere else. A model that reads negation should prefer *"there is no pleural effusion."* on the
clean image and *"there is a pleural effusion."* on the other; many CLIP models score both statements
alike, because their text embeddings barely change when "no" is swapped for "a".
"""),
    ("code", '''\
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

from negtrace.data.phantom import PhantomSpec, build_phantom_dataset, render_pair


def to_pil(gray):
    return Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L").convert("RGB")


render_size = max(64, model.image_size[0])
spec = PhantomSpec.build({"Pleural Effusion": {"side": "left", "size": "moderate"}})
with_effusion, without_effusion = render_pair(spec, "Pleural Effusion", size=render_size, seed=SEED)
statements = ["there is no pleural effusion.", "there is a pleural effusion."]
pixels = torch.stack([model.preprocess(to_pil(im)) for im in (without_effusion, with_effusion)])
with torch.inference_mode():
    logits = model.logits(pixels.to(model.device), statements).float().cpu().numpy()  # (image, statement)

fig_images = make_subplots(rows=1, cols=2, subplot_titles=("without effusion", "with left effusion"))
for col, im in enumerate((without_effusion, with_effusion), start=1):
    fig_images.add_trace(go.Heatmap(z=im[::-1], colorscale="gray", showscale=False, hoverinfo="skip"), row=1, col=col)
fig_images.update_xaxes(visible=False).update_yaxes(visible=False, scaleanchor="x")
fig_images.update_layout(width=620, height=360, title="Phantom pair (the patient's left is on the image's right)")
for i, name in enumerate(("without effusion", "with effusion")):
    print(f"{name:>17}: " + ", ".join(f"{s!r} {logits[i, j]:.3f}" for j, s in enumerate(statements)))
fig_images'''),
    ("md", """
## Tracing one example

One sweep restores, for every layer and every token, the residual stream (`resid`: the state
*leaving* block $l$; row "emb" is the token embedding), the attention output (`attn`) and the MLP
output (`mlp`) of that block. The cue token is starred and boxed. In a causal text tower nothing
before the cue can differ between the two runs, so those cells are exactly 0 and are not computed.
"""),
    ("code", '''\
image = pixels[:1]  # the image without the effusion: the negated statement is the true one
one = nt.patch(model, "there is no pleural effusion.", image=image, sites=("resid", "attn", "mlp"),
               heads=True, progress=False)
print(f"clean logit {one.clean_metric:.3f}, corrupted logit {one.corrupted_metric:.3f}, "
      f"denominator {one.denominator:.3f}{' (FLAGGED: too small to normalise by)' if one.flagged else ''}")
nt.heatmap(one)'''),
    ("md", """
## Aggregating over phantom tracing pairs

One sentence is an anecdote. `negtrace.data.pairs.build_tracing_pairs` (the library behind
`negtrace build pairs --tokenizer clip-bpe --labels ... --images-per-finding N`) writes minimal pairs
for every finding and template, keeps those whose two sides have equal token counts under this
model's tokenizer, and ties each pair to phantom images in which the finding is absent, so the clean
(negated) statement is always the true one. Examples of different lengths are averaged by **role**
(start, tokens before the cue, cue, first / further subject tokens, after, final punctuation, end),
with bootstrap confidence intervals over examples.
"""),
    ("code", imports("from negtrace.data.labels import read_labels",
                     "from negtrace.data.pairs import DEFAULT_TEMPLATES, build_tracing_pairs",
                     "from negtrace.evaluate import load_image") + COMPLETE_LABELS + '''


build_phantom_dataset(OUT / "phantoms", n_train=0, n_val=0, n_test=N_IMAGES, size=render_size, seed=SEED,
                      progress=False)
table = read_labels(complete_label_csv(OUT / "phantoms" / "attributes_test.jsonl", OUT / "labels_complete.csv"))
pair_set = build_tracing_pairs(FINDINGS_TRACED, [t for t in DEFAULT_TEMPLATES if t.template_id in TEMPLATES],
                               count_tokens=lambda text: int(model.tokenizer([text]).lengths[0]),
                               table=table, images_per_finding=IMAGES_PER_FINDING, seed=SEED)
pairs = pair_set.pairs
print(pair_set.stats)
print("e.g.", pairs[0].clean, "|", pairs[0].corrupted, "|", pairs[0].image_path)

pair_images = torch.stack([model.preprocess(load_image(OUT / "phantoms" / p.image_path)) for p in pairs])
results = nt.patch(model, clean=[p.clean for p in pairs], corrupted=[p.corrupted for p in pairs],
                   images=pair_images, sites=("resid", "attn", "mlp"), heads=True, progress=False)
agg = nt.aggregate(results, n_boot=N_BOOT, seed=SEED)
print(f"{len(results)} examples traced, {agg.n_excluded} excluded (denominator below threshold)")'''),
    ("md", """
## Figure 1: the aggregate CTE map

Rows are layers, columns are position roles; each facet is one site. Hover for the 95% bootstrap
interval and the number of examples behind each cell. Things to look for: whether the effect stays
at the cue through the early layers and then moves to the end-of-text token (where CLIP pools), and
which blocks' attention or MLP outputs carry it on the way.
"""),
    ("code", '''\
fig_map = nt.heatmap(agg)
fig_map'''),
    ("md", """
## Figure 2: attention heads

Restoring one head's output (its `z`, at every position) at a time. The strongest attention block
is the one with the largest mean CTE over roles; its heads are shown with bootstrap intervals over
examples. Heads of one block can cancel: a head with a negative CTE pushes the corrupted run further
away from the clean one.
"""),
    ("code", '''\
from negtrace.evaluate import bootstrap_ci
from negtrace.plot import head_heatmap

attn_per_layer = agg.per_layer("attn", "mean").numpy()
strongest_attn = int(np.nanargmax(attn_per_layer[1:])) + 1  # layer rows 1..L are blocks
per_example = np.stack([r.head_values[strongest_attn - 1].numpy() for r in results if not r.flagged])
head_mean = per_example.mean(0)
head_lo, head_hi = bootstrap_ci(per_example, n_boot=N_BOOT, seed=SEED)
fig_heads = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                          subplot_titles=("all blocks", f"block {strongest_attn}, 95% CI over examples"))
for trace in head_heatmap(agg).data:
    fig_heads.add_trace(trace, row=1, col=1)
fig_heads.add_trace(go.Bar(x=[str(h) for h in range(len(head_mean))], y=head_mean, marker_color="#b2182b",
                           error_y=dict(type="data", symmetric=False, array=head_hi - head_mean,
                                        arrayminus=head_mean - head_lo), showlegend=False), row=1, col=2)
zmax = float(np.nanmax(np.abs(agg.head_values.numpy()))) or 1e-6
fig_heads.update_layout(coloraxis=dict(colorscale="RdBu", reversescale=True, cmin=-zmax, cmax=zmax, cmid=0),
                        title="Per-head CTE (attention output of one head restored at every position)",
                        width=900, height=380)
n_blocks = agg.head_values.shape[0]
fig_heads.update_xaxes(title_text="head", row=1, col=1)
fig_heads.update_yaxes(title_text="block", tickvals=list(range(n_blocks)),
                       ticktext=[str(b) for b in range(1, n_blocks + 1)], row=1, col=1)
fig_heads.update_xaxes(title_text="head", row=1, col=2).update_yaxes(title_text="CTE", row=1, col=2)
fig_heads'''),
    ("md", """
## Figure 3: per-layer summary

The mean CTE over roles per layer and site, the statistic `negtrace.layer_scales` turns into
per-layer learning rates. The error bars are the same mean taken over the per-cell 95% bootstrap
bounds: an envelope of the cell intervals, not an interval of the summary itself.
"""),
    ("code", '''\
from negtrace.plot import layer_bar

fig_layers = make_subplots(rows=1, cols=len(agg.sites), shared_yaxes=True, subplot_titles=agg.sites)
for col, site in enumerate(agg.sites, start=1):
    for trace in layer_bar(agg, site=site, stat="mean").data:
        fig_layers.add_trace(trace.update(showlegend=False), row=1, col=col)
    fig_layers.update_xaxes(type="category", title_text="layer", row=1, col=col)
fig_layers.update_yaxes(title_text="mean CTE over roles", row=1, col=1)
fig_layers.update_layout(title=f"Per-layer mean CTE, n={len(results) - agg.n_excluded}", width=900, height=360)
fig_layers'''),
    ("md", """
## Exporting a figure for a paper

`paper_layout` sizes a copy in inches with a small font; `save_figure` writes HTML, PNG, SVG or PDF by
extension (static formats need Chrome/Chromium for kaleido; without it this cell says so instead of
failing).
"""),
    ("code", '''\
from negtrace.plot import MISSING_CHROME, paper_layout

pdf_path = OUT / "cte_heatmap.pdf"
try:
    nt.save_figure(paper_layout(fig_map, width_in=7.0, height_in=2.8), pdf_path)
    print(f"wrote {pdf_path} ({pdf_path.stat().st_size} bytes)")
except RuntimeError as err:
    if str(err) != MISSING_CHROME:
        raise
    pdf_path = None
    print("PDF export skipped:", err)
html_path = nt.save_figure(fig_map, OUT / "cte_heatmap.html")'''),
    ("md", """
## Vision tower: where is the finding in the image?

*(This section needs `negtrace.patch(..., tower="vision")`; on a negtrace without it the next cell
says so and skips, and the final checks skip the vision quantities.)*

The same recipe on the image tower. The clean run sees a phantom **with** a finding, the corrupted
run the same patient **without** it (`render_pair`: identical anatomy and noise, different only in the
finding's region), and the text is fixed: *"there is a {finding}."* Restoring one patch's state at one
layer asks how much of the logit change that patch carries there. Position 0 is the class token
(CLIP pools it); positions 1.. are patches in row-major order, drawn as a grid over the image.
"""),
    ("code", '''\
import inspect

from negtrace.data.pairs import PAIR_NAMES
from negtrace.plot import patch_grid

VISION_API = "tower" in inspect.signature(nt.patch).parameters
VISION_FINDINGS = ["Pleural Effusion", "Cardiomegaly"] if SMALL else ["Pleural Effusion", "Pneumothorax", "Cardiomegaly"]
VISION_PATIENTS = 2 if SMALL else 8
vision_results, vision_agg = [], None
if not VISION_API:
    print("this negtrace has no vision-tower tracing (negtrace.patch(..., tower='vision')); section skipped")
else:
    from negtrace.data.phantom import sample_specs

    clean_px, corrupted_px, vision_texts, first_clean_image = [], [], [], None
    for finding in VISION_FINDINGS:
        # patients who have the finding, from the same CheXpert-calibrated sampler as the datasets
        specs = [sp for sp in sample_specs(40, seed=(SEED, 99), prevalence={finding: 0.9}) if sp.has(finding)]
        for k, sp in enumerate(specs[:VISION_PATIENTS]):
            present, absent = render_pair(sp, finding, size=render_size, seed=(SEED, k))
            first_clean_image = present if first_clean_image is None else first_clean_image
            clean_px.append(model.preprocess(to_pil(present)))
            corrupted_px.append(model.preprocess(to_pil(absent)))
            vision_texts.append(f"there is a {PAIR_NAMES[finding]}.")
    vision_results = nt.patch(model, vision_texts, tower="vision", images=torch.stack(clean_px),
                              corrupted_images=torch.stack(corrupted_px), sites=("resid", "attn", "mlp"),
                              progress=False)
    n_kept = sum(not r.flagged for r in vision_results)
    print(f"{len(vision_results)} image pairs traced, {len(vision_results) - n_kept} flagged (logit barely "
          f"changes with the finding)")
    if n_kept:
        vision_agg = nt.aggregate(vision_results, n_boot=N_BOOT, seed=SEED)
fig_vision = patch_grid(vision_agg, image=first_clean_image, site="resid") if vision_agg is not None else None
fig_vision'''),
    ("md", """
Each panel is one layer of the residual stream: red patches are those whose clean state, restored
alone, moves the corrupted run's logit toward the clean one. Early layers should light up where the
finding is drawn (the costophrenic angle for an effusion, the heart border for cardiomegaly); in late
layers the evidence has been gathered into the class token, so single patches matter less. The map
is averaged over patients and findings here, so it blurs regions that differ between them; trace one
pair to see one finding's region. The grayscale image underneath is the first clean example.
"""),
    ("md", """
## What these maps say, and what they do not

* **CTE is not a probability.** It is a normalised difference of logits: it can exceed 1 (a
  restored state overshoots the clean run) or be negative (it pushes the other way), and values at
  different positions do not sum to 1.
* **Effects depend on the corruption.** Here the corrupted run is the affirmative counterpart
  ("no" → "a", "without" → "with"). Noise on the cue embedding (`corrupt="noise"`, ROME-style) or a
  neutral substitute (`corrupt="substitute"`) ask different questions and give different maps.
* **The denominator matters.** Examples whose clean and corrupted logits barely differ are excluded
  (`agg.n_excluded`), not divided by a tiny number. If a model hardly separates the two statements,
  the map describes the little that differs.
* **Text tower only, one metric.** The image is fixed; a different image or metric (caption-foil
  margin, option probability) can move the effect.
* **Random fallback.** If the warning at the top fired, this notebook ran on a random model: the maps
  show what the pipeline computes, not where any trained model processes negation.

The last cell checks that the quantities shown are present and finite.
"""),
    ("code", '''\
import math

assert len(pairs) > 0 and len(results) == len(pairs)
assert agg.n_excluded < len(results), "every example was excluded"
assert math.isfinite(one.clean_metric) and math.isfinite(one.corrupted_metric)
assert np.isfinite(logits).all()
kept = len(results) - agg.n_excluded
for site in agg.sites:
    grid = agg.site(site).numpy()
    rows = grid if site == "resid" else grid[1:]  # attn/mlp have no embedding row
    assert np.isfinite(rows[:, agg.labels.index("end")]).all(), f"{site}: end-token column not finite"
    assert np.isfinite(agg.per_layer(site, "mean").numpy()[1:]).all(), site
assert np.isfinite(head_mean).all() and np.isfinite(head_lo).all() and np.isfinite(head_hi).all()
assert (head_lo <= head_mean + 1e-6).all() and (head_mean <= head_hi + 1e-6).all()
assert np.isfinite(agg.head_values.numpy()).all()
assert pdf_path is None or pdf_path.stat().st_size > 0
assert (OUT / "cte_heatmap.html").stat().st_size > 0
if VISION_API:
    assert len(vision_results) == len(VISION_FINDINGS) * VISION_PATIENTS
    for r in vision_results:
        assert r.tower == "vision" and r.grid is not None and math.isfinite(r.clean_metric)
    if vision_agg is not None:  # None only when every pair was flagged (a model blind to the finding)
        patches = vision_agg.site("resid").numpy()[:, 1:]
        assert np.isfinite(patches).all() and len(fig_vision.data) > 0
print(f"all displayed quantities finite ({kept} examples, strongest attention block {strongest_attn})")'''),
]


# ------------------------------------------------------------------------------------------
# 03: selective fine-tuning (NAST)
# ------------------------------------------------------------------------------------------
NB03 = [
    ("md", """
# Selective fine-tuning: from a causal-tracing map to per-layer learning rates

Notebooks 01 and 02 found *where* the embedded phantom model processes negation and *how much*
negation costs it on the polarity MCQ. This notebook closes the loop the NAST recipe proposes
(Abbasi et al. 2026): trace negation in the text tower, turn the map into one scale per block,
and fine-tune each block with its own learning rate, so that the blocks that carry negation
change most. Three runs get the same budget and differ only in the scales:

* **uniform**: every text block at scale 1 (ordinary fine-tuning of the text tower);
* **shuffled**: the NAST scales permuted across blocks (same values, wrong blocks);
* **NAST**: the scales from the tracing map.

Everything runs on procedurally rendered phantoms (`negtrace.data.phantom`): no data download.
"""),
    ("params", parameters('''\
N_TRAIN = 64 if SMALL else 2000          # phantom training images (reports as captions)
N_TEST = 48 if SMALL else 500            # phantom test images (polarity MCQ items)
IMAGE_SIZE = 224                         # the phantom model's input size
STEPS = 8 if SMALL else 300              # optimizer steps per run (the same for every run)
BATCH_SIZE = 16 if SMALL else 32         # examples per step
LR = 1e-4                                # base learning rate (AdamW); block l trains at LR * s_l
N_BOOT = 200 if SMALL else 1000          # bootstrap resamples for confidence intervals
OUT = OUT / "03_selective_finetuning"''')),
    ("md", """
## The model and the data

`negtrace.load("phantom")` is the small CLIP trained on the phantom world and shipped with
negtrace; its weights are stored in fp16 and fine-tuned here in fp32. The training set is
phantom studies with their report-style captions; for every caption that negates something,
the loader adds a NegCLIP-style hard negative with the negations flipped ("No pleural
effusion." → "A pleural effusion."). The test set becomes polarity MCQ items from *complete*
labels: the phantom world knows every finding, so every finding a study does not have is a
certain absence (see notebook 02).
"""),
    ("code", '''\
import time

import numpy as np
import torch

import negtrace as nt
from negtrace.data.phantom import build_phantom_dataset

torch.manual_seed(SEED)
model = nt.load("phantom")
model.model.float()  # fp16 shipped weights: train and evaluate in fp32
text_adapter = model.adapters["text"]
print(f"text tower: {text_adapter.n_layers} blocks x {text_adapter.n_heads} heads; images {model.image_size}")'''),
    ("code", imports("from negtrace.data.labels import read_labels",
                     "from negtrace.data.polarity import build_polarity",
                     "from negtrace.finetune.data import load_examples") + COMPLETE_LABELS + '''


summary = build_phantom_dataset(OUT / "phantoms", n_train=N_TRAIN, n_val=0, n_test=N_TEST, size=IMAGE_SIZE,
                                seed=SEED, progress=False)
print(f"{summary.rendered} images rendered ({summary.skipped} already there) in {summary.seconds:.1f} s")
train = load_examples(OUT / "phantoms", "phantom", "train")
complete_csv = complete_label_csv(OUT / "phantoms" / "attributes_test.jsonl", OUT / "labels_test_complete.csv")
items = build_polarity(read_labels(complete_csv), seed=SEED).items
with_negative = sum(bool(e.negatives) for e in train)
print(f"{len(train)} training examples ({with_negative} with a flipped-negation hard negative); "
      f"{len(items)} polarity items")
example = next((e for e in train if e.negatives), train[0])
print("e.g.", repr(example.caption), "->", repr(example.negatives[0]) if example.negatives else "(no negation)")'''),
    ("md", """
## Where does the text tower process negation?

The same tracing as `benchmarks/nast_phantom.py`: one negated sentence per finding, *"there is
no {finding}."*, traced against its affirmative counterpart (*"there is a {finding}."*) with the
text-only metric (cosine to the clean sentence embedding), restoring each block's attention
output (`attn`) at each position. `nt.aggregate` averages the maps by position role.
"""),
    ("code", '''\
from negtrace.data.polarity import FINDING_PHRASES

SENTENCES = [f"there is no {phrases[0]}." for phrases in FINDING_PHRASES.values()]


def trace(m):
    results = nt.patch(m, clean=SENTENCES, sites=("attn",), progress=False)
    return nt.aggregate(results, n_boot=N_BOOT, seed=SEED)


started = time.perf_counter()
agg = trace(model)
print(f"{len(SENTENCES)} sentences traced in {time.perf_counter() - started:.1f} s, {agg.n_excluded} excluded")
nt.heatmap(agg, title="Attention-output CTE before fine-tuning")'''),
    ("md", """
## From the map to layer scales

`nt.layer_scales` reduces each block's row of the map to one number (`stat="mean"`: the mean
CTE over position roles; negative means count as 0, they are no evidence that a block processes
negation) and normalises with a policy: `policy="max"` divides by the largest, so the block that
carries most of the effect gets scale 1 and the others a fraction of it; `floor=0.05` keeps every
block trainable. Block *l* then trains with learning rate `LR × s_l`. Groups that get no scale
(the vision tower, embeddings, final projection) stay frozen.

Why scale the **learning rate** and not the gradient? Under Adam and AdamW each coordinate's step
is the gradient's running mean divided by its running RMS, so multiplying a block's gradient by
a constant leaves its step unchanged: "the magnitudes of parameter updates are invariant to
rescaling of the gradient" (Kingma & Ba 2014, §2.1). The learning rate of a parameter group
scales the step under any optimizer. (`method="grad"` exists for SGD and warns under Adam;
`method="lora"` scales each block's LoRA alpha instead.)
"""),
    ("code", '''\
scales = nt.layer_scales(agg, policy="max", stat="mean", site="attn", floor=0.05)
print(scales)
print(f"sum of scales {sum(scales.values()):.2f} (uniform: {len(scales)}): with policy='max' the NAST and "
      "shuffled runs train with a smaller total learning rate than the uniform run")
scales.figure()'''),
    ("md", """
## Three runs at the same budget

Each run starts from the same (shipped) weights and uses the same examples, order, steps,
batch size and base learning rate; only the scales differ. `selective_finetune` evaluates the
polarity MCQ before and after (accuracy on the negated and on the affirmative wording of the
same items, and the gap between them) and writes metrics, evaluations and weights to its
`out_dir`.
"""),
    ("code", '''\
variants = {"uniform": scales.uniform(), "shuffled": scales.shuffled(SEED), "NAST": scales}
initial = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
runs = {}
for name, variant in variants.items():  # NAST last: `model` keeps its weights for the re-trace below
    model.model.load_state_dict(initial)  # every run starts from the shipped weights
    started = time.perf_counter()
    runs[name] = nt.selective_finetune(model, variant, train, method="lr", lr=LR, steps=STEPS,
                                       batch_size=BATCH_SIZE, seed=SEED, eval_polarity=items,
                                       eval_images=str(OUT / "phantoms"), out_dir=OUT / "runs" / name,
                                       resume=False, progress=False)
    losses = [h["loss"] for h in runs[name].history]
    print(f"{name:>8}: {runs[name].steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{time.perf_counter() - started:.1f} s")

KEYS = {"accuracy_negated": "negated", "accuracy_affirmative": "affirmative", "gap": "gap (aff - neg)"}
before = {label: runs["uniform"].before["polarity"][key] for key, label in KEYS.items()}
after = {name: {label: r.after["polarity"][key] for key, label in KEYS.items()} for name, r in runs.items()}
print(f"\\n{'':>9} " + "".join(f"{label:>18}" for label in KEYS.values()))
for name, row in {"before": before, **after}.items():
    print(f"{name:>9} " + "".join(f"{row[label]['value']:>18.3f}" for label in KEYS.values()))'''),
    ("code", '''\
import plotly.graph_objects as go

COLORS = {"before": "#7f7f7f", "uniform": "#1f77b4", "shuffled": "#ff7f0e", "NAST": "#b2182b"}
fig_mcq = go.Figure()
for name, row in {"before": before, **after}.items():
    entries = [row[label] for label in KEYS.values()]
    fig_mcq.add_bar(name=name, x=list(KEYS.values()), y=[e["value"] for e in entries], marker_color=COLORS[name],
                    error_y=dict(type="data", symmetric=False, array=[e["ci"][1] - e["value"] for e in entries],
                                 arrayminus=[e["value"] - e["ci"][0] for e in entries]))
fig_mcq.add_hline(y=0, line_color="black")
fig_mcq.update_layout(barmode="group", width=820, height=420, yaxis_title="accuracy / gap",
                      title=f"Polarity MCQ before and after fine-tuning ({len(items)} items, {STEPS} steps x "
                            f"{BATCH_SIZE}, 95% bootstrap CI)")
fig_mcq'''),
    ("md", """
**Read these bars as a demonstration, not a result.** At notebook size (a few dozen items, a
handful of steps, one seed) the intervals are wide and the differences between runs are noise.
The controlled comparison is `benchmarks/nast_phantom.py` (frozen baseline vs uniform vs
shuffled vs NAST, several seeds, hundreds of items, retrieval and AUC retention), and its result
on the embedded model is the table in the README ("Does it help?"): at that budget NAST does
**not** beat the controls.
"""),
    ("md", """
## Did the map move?

Tracing the NAST-fine-tuned model again with the same sentences shows whether training changed
where negation is processed: the same heatmap after training, and the per-block mean CTE
(the statistic the scales came from) before and after.
"""),
    ("code", '''\
agg_after = trace(model)  # the NAST run trained `model` in place, last
per_block_before = agg.per_layer("attn", "mean").numpy()[1:]
per_block_after = agg_after.per_layer("attn", "mean").numpy()[1:]
for layer, (b, a) in enumerate(zip(per_block_before, per_block_after, strict=True)):
    print(f"text.blocks.{layer}: scale {scales[f'text.blocks.{layer}']:.3f}, mean CTE {b:+.3f} -> {a:+.3f}")
nt.heatmap(agg_after, title="Attention-output CTE after NAST fine-tuning")'''),
    ("md", """
## What to take away

* The scales are a hypothesis read off the map ("train the blocks that carry negation"), and
  the uniform and shuffled runs are what tests it: a gain that shuffled scales also give comes
  from the amount of training, not from the map.
* With `policy="max"` the scaled runs train with less total learning rate than the uniform run;
  `policy="sum"` keeps the total equal.
* Change `STEPS`, `LR`, the policy or `method="lora"` in the parameters cell, or run the
  benchmark, before concluding anything.

The last cell checks that every quantity shown is present and finite.
"""),
    ("code", '''\
import math

assert len(train) >= BATCH_SIZE and len(items) > 0
assert agg.n_excluded < len(SENTENCES) and agg_after.n_excluded < len(SENTENCES)
assert len(scales) == text_adapter.n_layers
assert all(math.isfinite(v) and 0.05 - 1e-9 <= v <= 1 + 1e-9 for v in scales.values())
assert max(scales.values()) == 1.0
for name, r in runs.items():
    assert r.steps == STEPS and len(r.history) == STEPS, name
    assert all(math.isfinite(h["loss"]) for h in r.history), name
    assert (OUT / "runs" / name / "model.safetensors").stat().st_size > 0, name
for row in (before, *after.values()):
    for entry in row.values():
        assert math.isfinite(entry["value"]) and all(math.isfinite(c) for c in entry["ci"]), entry
assert np.isfinite(per_block_before).all() and np.isfinite(per_block_after).all()
assert len(fig_mcq.data) == 1 + len(runs)
print(f"all displayed quantities finite ({len(runs)} runs x {STEPS} steps, {len(items)} polarity items)")'''),
]


def build(name: str, cells: list[tuple[str, str]]) -> Path:
    nb = new_notebook(cells=_cells(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = HERE / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


NOTEBOOKS = {"01_where_is_negation.ipynb": NB01, "02_negation_benchmarks.ipynb": NB02,
             "03_selective_finetuning.ipynb": NB03}


def main(argv: list[str] | None = None) -> int:
    names = argv or sys.argv[1:] or list(NOTEBOOKS)
    for name in names:
        print("wrote", build(name, NOTEBOOKS[name]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
