"""UCE: the closed-form edit changes only the cross-attention keys and values, maps the erased
concept's tokens where its guide's go, and erases a shape of the built-in world in seconds."""

from __future__ import annotations


import pytest
import torch

from fasterase import api
from fasterase.closed_form import preservation_gram, save_gram
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.configs import UCEConfig
from fasterase.methods.uce import UCE
from fasterase.models.text import concept_tail, encode_prompts


def erase(pipe_dir, **options):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(pipe_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    reports = []
    cfg = make_config(UCEConfig, {"concepts": ["circle"], **options})
    result = UCE().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    return pipe, before, result, reports


@pytest.mark.parametrize("options", [{}, {"preserve": ["square"], "guide": ["ring"]}])
def test_uce_changes_only_cross_attention_keys_and_values(tiny_pipeline_dir, options):
    pipe, before, result, reports = erase(tiny_pipeline_dir, **options)
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == set(result.tensors)
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert result.key is None
    assert reports[0] == (0, 1, {}) and reports[-1][:2] == (1, 1)
    fit = reports[-1][2]
    assert set(fit) == {"erased_residual", "preserved_change"} and 0 < fit["erased_residual"] < 0.5
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_the_concept_prompt_is_projected_like_its_guide(tiny_pipeline_dir):
    pipe, before, result, _ = erase(tiny_pipeline_dir, guide=["ring"], templates=["a photo of a {}"])
    concept, guide = encode_prompts(pipe, ["a photo of a circle", "a photo of a ring"])
    name = next(n for n in result.tensors if ".attn2.to_k." in n).removeprefix("unet.")
    w_old, w_new = before[name], dict(pipe.unet.named_parameters())[name]
    # from the concept's token (position 5) on, the edited keys approach the guide's
    start = (concept[5:] @ w_old.T - guide[5:] @ w_old.T).norm()
    assert (concept[5:] @ w_new.T - guide[5:] @ w_old.T).norm() < 0.5 * start


def test_same_weights_whatever_backend(tiny_pipeline_dir):
    # triton has no ridge_solve: forced, the run solves with the reference
    results = [erase(tiny_pipeline_dir, backend=backend)[2].tensors for backend in ("torch", "auto", "triton")]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_preservation_gram_cache_is_used_and_checked(tiny_pipeline_dir, tmp_path):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    path = tmp_path / "gram.safetensors"
    save_gram(path, preservation_gram(pipe, ["a photo of a square", "a photo of a star"] * 20, "tiny"))
    plain = erase(tiny_pipeline_dir)[2].tensors
    cached = erase(tiny_pipeline_dir, preserve_gram=str(path))[2].tensors
    assert any(not torch.equal(plain[k], cached[k]) for k in plain)
    with pytest.raises(UserError, match="no such file"):
        erase(tiny_pipeline_dir, preserve_gram=str(tmp_path / "missing.safetensors"))


def test_edited_positions_run_from_the_concepts_last_token():
    from transformers import CLIPTokenizer

    from fasterase.models.loading import builtin_model_dir

    tokenizer = CLIPTokenizer.from_pretrained(str(builtin_model_dir() / "tokenizer"))
    mask = concept_tail(tokenizer, ["circle", "a photo of a red circle"], ["circle", "red circle"], from_last=True)
    assert mask[0].nonzero().min() == 1 and mask[1].nonzero().min() == 6 and mask.all(1).logical_not().all()
    assert mask[:, -1].all()


@pytest.mark.parametrize("options, message", [
    ({"concepts": ["circle", "square"], "guide": ["a", "b", "c"]}, "one per erased concept"),
    ({"concepts": ["circle"], "templates": ["a photo"]}, "must contain"),
    ({"concepts": ["circle"], "lam": -0.5}, "lam must be at least 0"),
    ({"concepts": ["circle"], "pairing": "tail"}, "pairing must be one of"),
    ({"concepts": ["circle"], "preserve_gram": "a.safetensors:-1"}, "finite weight of at least 0"),
    ({"concepts": ["circle"], "preserve_gram": "a.safetensors:nan"}, "finite weight of at least 0"),
    ({"concepts": ["circle"], "preserve_scale": -1.0}, "preserve_scale"),
    ({"concepts": ["circle"], "guide": "ring"}, "must be a list"),
])
def test_config_errors(options, message):
    with pytest.raises(UserError, match=message):
        make_config(UCEConfig, options)


def test_guides_and_prompt_concepts():
    cfg = make_config(UCEConfig, {"concepts": ["circle", "square"], "preserve": ["star"], "guide": ["ring", ""]})
    assert cfg.guides() == ["ring", ""] and cfg.prompt_concepts() == ["circle", "square", "star", "ring"]
    assert make_config(UCEConfig, {"concepts": ["circle", "square"]}).guides() == ["", ""]


@pytest.mark.slow
def test_erases_the_shape_and_keeps_the_others(tmp_path, assert_erased, world_sampling):
    summary = api.erase("uce", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))
