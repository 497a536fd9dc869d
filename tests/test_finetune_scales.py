import json
import math

import numpy as np
import pytest
import torch

from negtrace.finetune.scales import LayerScales, layer_scales
from negtrace.patching.result import CTEResult


def _result(rows, tower="text", sites=("resid",)):
    """CTE map whose per-position values are given per layer row (2 positions, equal values)."""
    v = torch.tensor(rows, dtype=torch.float32)[None, :, None].repeat(len(sites), 1, 2)
    return CTEResult(values=v, sites=tuple(sites), labels=["cue", "end"], tower=tower, roles=["cue", "end"])


ROWS = [0.9, 0.2, 0.6, -0.3, 0.4]  # row 0 = embedding, rows 1..4 = blocks 0..3


def test_rows_map_to_blocks_and_max_policy():
    s = layer_scales(_result(ROWS), "max")
    # row r >= 1 is block r-1; the embedding row is left out by default; negatives clip to 0
    assert dict(s) == pytest.approx({"text.blocks.0": 0.2 / 0.6, "text.blocks.1": 1.0, "text.blocks.2": 0.0,
                                     "text.blocks.3": 0.4 / 0.6})
    with_embed = layer_scales(_result(ROWS), "max", include_embed=True)
    assert with_embed["text.embed"] == pytest.approx(1.0) and with_embed["text.blocks.1"] == pytest.approx(0.6 / 0.9)


def test_sum_softmax_rank_against_numpy():
    v = np.clip(np.array(ROWS[1:]), 0, None)
    names = [f"text.blocks.{i}" for i in range(4)]
    s = layer_scales(_result(ROWS), "sum")
    assert [s[n] for n in names] == pytest.approx(list(4 * v / v.sum()))
    t = 0.5
    e = np.exp(v / t)
    s = layer_scales(_result(ROWS), "softmax", temperature=t)
    assert [s[n] for n in names] == pytest.approx(list(4 * e / e.sum()))
    s = layer_scales(_result([0, 0.3, 0.1, 0.3, 0.5]), "rank")
    assert [s[n] for n in names] == pytest.approx([2.5 / 4, 1 / 4, 2.5 / 4, 1.0])  # ties share mean rank
    s = layer_scales(_result(ROWS), "max", negative="abs")
    assert s["text.blocks.2"] == pytest.approx(0.3 / 0.6)


def test_floor_cap_and_stats():
    s = layer_scales(_result(ROWS), "sum", floor=0.1, cap=1.5)
    v = np.clip(np.array(ROWS[1:]), 0, None)
    assert [s[f"text.blocks.{i}"] for i in range(4)] == pytest.approx(list(np.clip(4 * v / v.sum(), 0.1, 1.5)))
    # statistics over positions: cue column vs pooled column
    vals = torch.zeros(1, 3, 2)
    vals[0, 1:, 0] = torch.tensor([1.0, 0.5])  # cue
    vals[0, 1:, 1] = torch.tensor([0.2, 0.8])  # end (pooled)
    r = CTEResult(values=vals, sites=("resid",), labels=["cue", "end"], roles=["cue", "end"])
    assert dict(layer_scales(r, "max", stat="cue")) == pytest.approx({"text.blocks.0": 1.0, "text.blocks.1": 0.5})
    assert dict(layer_scales(r, "max", stat="pooled")) == pytest.approx({"text.blocks.0": 0.25, "text.blocks.1": 1.0})
    assert dict(layer_scales(r, "max", stat="sum")) == pytest.approx({"text.blocks.0": 1.2 / 1.3, "text.blocks.1": 1.0})


def test_attn_rows_and_towers():
    text = _result(ROWS, sites=("resid", "attn"))
    text.values[1, 0] = float("nan")  # attn row 0 is NaN by convention
    vision = _result([0.5, 0.1, 0.2], tower="vision")
    s = layer_scales([text, vision], "max", site="resid")
    assert s["vision.blocks.1"] == pytest.approx(1.0) and s["vision.blocks.0"] == pytest.approx(0.5)
    assert s["text.blocks.1"] == pytest.approx(1.0)  # normalised per tower
    a = layer_scales(text, "max", site="attn", include_embed=True)
    assert "text.embed" not in a  # NaN row skipped
    with pytest.raises(ValueError, match="one CTE result per tower"):
        layer_scales([text, text])


def test_controls_and_persistence(tmp_path):
    s = layer_scales(_result(ROWS), "max")
    u = layer_scales(_result(ROWS), "max", control="uniform")
    assert set(u) == set(s) and set(u.values()) == {1.0}
    sh = layer_scales(_result(ROWS), "max", control="shuffled", seed=3)
    assert sorted(sh.values()) == pytest.approx(sorted(s.values())) and set(sh) == set(s)
    assert dict(sh) == dict(s.shuffled(3)) and dict(s.shuffled(3)) != dict(s.shuffled(4))
    path = s.save(tmp_path / "scales.json")
    back = LayerScales.load(path)
    assert dict(back) == dict(s) and back.meta["policy"] == "max"
    assert json.loads(path.read_text())["scales"] == dict(s)
    table = str(s)
    assert "text.blocks.1" in table and "1.000" in table and table.index("blocks.0") < table.index("blocks.3")
    fig = s.figure()
    assert list(fig.data[0].y) == pytest.approx([s[f"text.blocks.{i}"] for i in range(4)])


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "median"}, "unknown policy"), ({"stat": "mode"}, "unknown statistic"),
    ({"temperature": 0}, "temperature"), ({"floor": 2, "cap": 1}, "floor <= cap"),
    ({"control": "random"}, "unknown control"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_scales(_result(ROWS), **kwargs)


def test_bad_scale_values():
    with pytest.raises(ValueError, match="finite and >= 0"):
        LayerScales({"text.blocks.0": -1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        LayerScales({"text.blocks.0": math.nan})
