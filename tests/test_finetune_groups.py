from collections import Counter

from negtrace.finetune.groups import group_names, parameter_groups


def test_every_parameter_in_exactly_one_group(any_family):
    model = any_family
    groups = parameter_groups(model)
    named = dict(model.model.named_parameters())
    members = Counter(n for g in groups.values() for n, _ in g)
    assert set(members) == set(named)  # union == all named parameters
    assert max(members.values()) == 1  # no parameter twice
    for g in groups.values():  # names and objects agree
        assert all(named[n] is p for n, p in g)


def test_groups_follow_the_adapter_blocks(any_family):
    model = any_family
    groups = parameter_groups(model)
    for tower in ("text", "vision"):
        blocks = model.adapters[tower].blocks()
        for layer, block in enumerate(blocks):
            assert {id(p) for _, p in groups[f"{tower}.blocks.{layer}"]} == {id(p) for p in block.parameters()}
        assert groups[f"{tower}.embed"] and groups[f"{tower}.final"]
    assert [n for n, _ in groups["logit_scale"]] == ["logit_scale"]
    assert [g for g in groups if g not in ("logit_scale", "other")] == group_names(model)


def test_embed_and_final_are_measured(tiny_clip, tiny_biomedclip, tiny_hf_clip):
    names = lambda m, g: {n for n, _ in parameter_groups(m)[g]}  # noqa: E731
    assert names(tiny_clip, "text.embed") == {"token_embedding.weight", "positional_embedding"}
    assert names(tiny_clip, "text.final") == {"ln_final.weight", "ln_final.bias", "text_projection"}
    assert "visual.ln_pre.weight" in names(tiny_clip, "vision.embed")
    assert names(tiny_clip, "vision.final") == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    assert "text.transformer.embeddings.LayerNorm.weight" in names(tiny_biomedclip, "text.embed")
    assert "visual.head.proj.weight" in names(tiny_biomedclip, "vision.final")
    assert "vision_model.pre_layrnorm.weight" in names(tiny_hf_clip, "vision.embed")
    assert "text_projection.weight" in names(tiny_hf_clip, "text.final")


def test_frozen_parameters_keep_their_flag(tiny_clip):
    p = tiny_clip.model.ln_final.weight
    p.requires_grad_(False)
    try:
        assert "ln_final.weight" in {n for n, _ in parameter_groups(tiny_clip)["text.final"]}
        assert p.requires_grad is False
    finally:
        p.requires_grad_(True)
