"""HookedVLM against the unhooked model, hook semantics, cache shapes and bad input."""

import copy

import open_clip
import pytest
import torch
from conftest import random_images

import negtrace
from negtrace.models.sites import BlockSite, all_hook_names, hook_name

TEXTS = ["No pleural effusion.", "There is a small left pneumothorax without consolidation."]


def _reference_text(model, texts):
    """The original model's own encode_text / get_text_features on an unwrapped copy."""
    inner = model.model
    tokens = model.tokenize(texts)
    if isinstance(inner, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        ref = copy.deepcopy(model).unwrap()
        return ref.encode_text(tokens.ids)
    ref = copy.deepcopy(model).unwrap()
    return ref.get_text_features(input_ids=tokens.ids, attention_mask=tokens.mask.long()).pooler_output


def _reference_image(model, images):
    ref = copy.deepcopy(model).unwrap()
    if isinstance(ref, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        return ref.encode_image(images)
    return ref.get_image_features(pixel_values=images).pooler_output


@torch.no_grad()
def test_outputs_equal_original_model(any_family):
    images = random_images(any_family)
    assert (any_family.encode_text(TEXTS) - _reference_text(any_family, TEXTS)).abs().max() <= 1e-6
    assert (any_family.encode_image(images) - _reference_image(any_family, images)).abs().max() <= 1e-6


@torch.no_grad()
def test_outputs_equal_with_hooks_attached(any_family):
    images = random_images(any_family)
    ref_t, ref_i = _reference_text(any_family, TEXTS), _reference_image(any_family, images)
    # residual/attn/mlp/embed/pooled sites: the original computation path runs, bit for bit
    not_heads = lambda name: not name.endswith(("hook_z", "hook_pattern"))  # noqa: E731
    out, cache = any_family.run_with_cache(texts=TEXTS, names_filter=not_heads)
    assert (out - ref_t).abs().max() <= 1e-6 and len(cache) > 0
    out, _ = any_family.run_with_cache(images=images, names_filter=not_heads)
    assert (out - ref_i).abs().max() <= 1e-6
    # per-head sites re-run attention explicitly (fused kernels hide z and the pattern):
    # equal up to float32 reassociation
    out, cache = any_family.run_with_cache(texts=TEXTS)
    assert (out - ref_t).abs().max() <= 2e-5
    out, _ = any_family.run_with_cache(images=images)
    assert (out - ref_i).abs().max() <= 2e-5


def _inputs(model, tower):
    return {"texts": TEXTS} if tower == "text" else {"images": random_images(model)}


@pytest.mark.parametrize("tower", ["text", "vision"])
@torch.no_grad()
def test_every_site_edit_takes_effect_and_identity_does_not(any_family, tower):
    clean = any_family(**_inputs(any_family, tower))
    last = any_family.n_layers(tower) - 1
    # edit the pooled position (EOT / CLS) so that even last-layer edits can reach the output
    pooled = int(any_family.tokenize(TEXTS).pooled_index[0]) if tower == "text" else 0
    names = [hook_name(tower, s, layer) for layer in (0, last) for s in BlockSite]
    names += [hook_name(tower, "embed"), hook_name(tower, "pooled"), hook_name(tower, "proj")]
    for name in names:
        def identity(x, hook):
            return x

        def ablate(x, hook):
            y = x.clone()
            if hook.name.endswith(("pooled", "proj")):
                y[0] = 0
            elif hook.name.endswith("hook_pattern"):
                y[0] = 1.0 / y.shape[-1]  # uniform attention on example 0
            else:
                y[0, 1 if hook.name.endswith("embed") else pooled] = 0  # one position of example 0
            return y

        same = any_family.run_with_hooks(**_inputs(any_family, tower), fwd_hooks=[(name, identity)])
        edited = any_family.run_with_hooks(**_inputs(any_family, tower), fwd_hooks=[(name, ablate)])
        assert torch.allclose(same, clean, atol=2e-5), name
        assert (edited[0] - clean[0]).abs().max() > 1e-4, f"edit at {name} was silently ignored"


def test_hook_returning_wrong_shape_raises(tiny_clip):
    name = hook_name("text", "resid_post", 0)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        tiny_clip.run_with_hooks(texts=TEXTS, fwd_hooks=[(name, lambda x, hook: x[:, :3])])


@torch.no_grad()
def test_cache_names_and_shapes_match_across_families(tiny_clip, tiny_biomedclip, tiny_hf_clip):
    for model in (tiny_clip, tiny_biomedclip, tiny_hf_clip):
        _, cache = model.run_with_cache(texts=TEXTS)
        a = model.adapters["text"]
        assert set(cache.keys()) == set(all_hook_names("text", a.n_layers))
        t = model.tokenize(TEXTS).ids.shape[1]
        d, h = a.d_model, a.n_heads
        assert cache["text.hook_embed"].shape == (2, t, d)
        for layer in range(a.n_layers):
            for site in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
                assert cache[f"text.blocks.{layer}.{site}"].shape == (2, t, d)
            assert cache[f"text.blocks.{layer}.attn.hook_z"].shape == (2, t, h, d // h)
            pattern = cache[f"text.blocks.{layer}.attn.hook_pattern"]
            assert pattern.shape == (2, h, t, t)
            real = model.tokenize(TEXTS).mask[:, None, :, None].expand_as(pattern)
            assert torch.allclose(pattern.sum(-1)[real[..., 0]], torch.ones(()), atol=1e-5)
        assert cache["text.hook_pooled"].shape == (2, d)
        # residual bookkeeping: resid_post(l) == resid_pre(l + 1)
        assert torch.equal(cache["text.blocks.0.hook_resid_post"], cache["text.blocks.1.hook_resid_pre"])
        _, vcache = model.run_with_cache(images=random_images(model))
        va = model.adapters["vision"]
        n_patches = va.grid[0] * va.grid[1]
        assert vcache["vision.hook_embed"].shape == (2, n_patches, va.d_model)
        assert vcache["vision.blocks.0.attn.hook_z"].shape[2:] == (va.n_heads, va.d_head)


def test_causal_pattern_is_lower_triangular(tiny_clip, tiny_hf_clip, tiny_biomedclip):
    for model, causal in ((tiny_clip, True), (tiny_hf_clip, True), (tiny_biomedclip, False)):
        _, cache = model.run_with_cache(texts=TEXTS, names_filter=lambda n: n.endswith("hook_pattern"))
        p = cache["text.blocks.0.attn.hook_pattern"][1]
        upper = p.triu(1).abs().max()
        assert (upper == 0) if causal else (upper > 0)


def test_names_filter_and_hooks_context(tiny_clip):
    name = hook_name("text", "resid_post", 1)
    _, cache = tiny_clip.run_with_cache(texts=TEXTS, names_filter=[name])
    assert list(cache.keys()) == [name]
    seen = []
    with tiny_clip.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(hook.name))]):
        tiny_clip.encode_text(TEXTS)
    tiny_clip.encode_text(TEXTS)
    assert seen == [name]


def test_tokenize_returns_strings_and_offsets(tiny_clip, tiny_biomedclip, tiny_hf_clip):
    text = "No pleural effusion."
    for model in (tiny_clip, tiny_biomedclip, tiny_hf_clip):
        tok = model.tokenize([text])
        assert len(tok.tokens[0]) == len(tok.offsets[0]) == int(tok.mask[0].sum())
        for s, span in zip(tok.tokens[0], tok.offsets[0], strict=True):
            if span is not None:
                assert text[span[0]:span[1]].lower() == s.lower().removeprefix("##")
        assert tok.offsets[0][0] is None  # start / CLS


def test_logits_shape_and_scale(tiny_clip):
    images = random_images(tiny_clip, 3)
    logits = tiny_clip.logits(images, TEXTS)
    assert logits.shape == (3, 2)
    img = torch.nn.functional.normalize(tiny_clip.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(tiny_clip.encode_text(TEXTS), dim=-1)
    expected = tiny_clip.model.logit_scale.exp() * img @ txt.T
    assert torch.allclose(logits, expected, atol=1e-5)


def test_nnsight_patch_equals_negtrace_patch(tiny_clip):
    name = hook_name("text", "resid_post", 1)
    patch = torch.randn(tiny_clip.adapters["text"].d_model, generator=torch.Generator().manual_seed(0))

    def set_pos(x, hook):
        x = x.clone()
        x[:, 2] = patch
        return x

    via_hooks = tiny_clip.run_with_hooks(texts=TEXTS, fwd_hooks=[(name, set_pos)])
    view = tiny_clip.nnsight()
    with view.trace(texts=TEXTS):
        view.text.blocks[1].hook_resid_post.output[:, 2] = patch
        out = view.output.save()
    assert (out - via_hooks).abs().max() <= 1e-6


def test_biomedclip_layout_loads_from_local_folder(tiny_biomedclip):
    assert tiny_biomedclip.adapters["text"].family == "open_clip-hf"
    assert tiny_biomedclip.adapters["text"].causal is False
    assert tiny_biomedclip.adapters["vision"].family == "open_clip-timm"
    assert tiny_biomedclip.logits(random_images(tiny_biomedclip), TEXTS).shape == (2, 2)


# -- bad input -------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'ViT-B-33'.*Close matches"):
        negtrace.load("ViT-B-33")


def test_hub_name_offline_fails_fast_with_local_folder_hint():
    with pytest.raises(Exception, match="local-dir:"):
        negtrace.load("hf-hub:nobody/not-a-model")


def test_text_longer_than_context(tiny_clip):
    long = "no effusion " * 60
    with pytest.raises(ValueError, match="context length is 77.*truncate=True"):
        tiny_clip.tokenize([long])
    tok = tiny_clip.tokenize([long], truncate=True)
    assert tok.ids.shape == (1, 77) and int(tok.pooled_index[0]) == 76


@pytest.mark.parametrize("shape", [(2, 3, 31, 32), (2, 1, 32, 32), (3, 32, 32, 1)])
def test_wrong_image_shape(tiny_clip, shape):
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\)"):
        tiny_clip.encode_image(torch.zeros(shape))


def test_nan_image(tiny_clip):
    img = torch.zeros(2, 3, 32, 32)
    img[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(batch rows \[1\]\)"):
        tiny_clip.encode_image(img)


def test_empty_texts(tiny_clip):
    with pytest.raises(ValueError, match="no texts given"):
        tiny_clip.encode_text([])
    with pytest.raises(ValueError, match="empty"):
        tiny_clip.encode_text(["  "])


def test_unknown_model_class():
    with pytest.raises(TypeError, match="Supported families: open_clip CLIP"):
        negtrace.load(torch.nn.Linear(2, 2))


def test_resnet_vision_not_supported():
    model = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(NotImplementedError, match="RN50"):
        negtrace.load(model, tokenizer=open_clip.get_tokenizer("RN50"))


def test_layer_out_of_range(tiny_clip):
    with pytest.raises(ValueError, match="text tower has 4 layers"):
        tiny_clip.hook_name("text", "resid_post", 4)
    with pytest.raises(ValueError, match="unknown site"):
        hook_name("text", "resid", 0)


def test_chexzero_shortcut_builds_openai_quickgelu(tmp_path):
    """CheXzero is OpenAI CLIP ViT-B/32: QuickGELU, not open_clip's GELU ViT-B-32."""
    import open_clip
    from open_clip.transformer import QuickGELU

    import negtrace

    plain = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    path = tmp_path / "chexzero.pt"
    torch.save(plain.state_dict(), path)
    model = negtrace.load("chexzero", pretrained=str(path))
    assert isinstance(model.unwrap().visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), plain.eval().encode_image(images), atol=1e-5)


def test_deepcopy_gives_an_independent_hooked_model(any_family):
    import copy

    import negtrace

    model = any_family
    twin = copy.deepcopy(model)
    text = "there is no pleural effusion."
    images = torch.randn(1, 3, *model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(twin.encode_text([text]), model.encode_text([text]), atol=1e-6)
        original = negtrace.patch(model, text, image=images, sites=("resid", "attn"), progress=False)
        copied = negtrace.patch(twin, text, image=images, sites=("resid", "attn"), progress=False)
        assert torch.allclose(original.values, copied.values, atol=1e-4, equal_nan=True)
        _, cache = twin.run_with_cache(texts=[text], names_filter=lambda n: n.endswith("blocks.0.hook_resid_post"))
        assert list(cache.keys()) == ["text.blocks.0.hook_resid_post"]
        before = model.encode_text([text]).clone()
        for p in twin.model.parameters():
            p.add_(0.1)
        assert torch.equal(model.encode_text([text]), before)  # the original is untouched
        assert not torch.allclose(twin.encode_text([text]), before)
        assert torch.allclose(twin.logit_scale, twin.model.logit_scale.exp())
