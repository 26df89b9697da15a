"""fasterase's cross-attention processors in a real (tiny, random) UNet: equivalence with diffusers,
restoring the original processors, where and for which batch items a learned prompt acts, and
capturing the attention paid to a concept's tokens."""

import pytest
import torch

from fasterase.attention import (
    AttentionCapture,
    CrossAttentionProcessor,
    LearnedPrompt,
    backend_processors,
    capture_processors,
    cross_attention_processors,
    prompt_processors,
)
from fasterase.names import is_cross_attention
from fasterase.models.loading import load_pipeline
from fasterase.models.text import encode_prompts, token_columns

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def batch(pipe):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500])
    context = encode_prompts(pipe, ["a photo of a circle", "a blue square on a striped background"])
    return latents, timesteps, context


@pytest.fixture(scope="module")
def baseline(pipe, batch):
    """diffusers' own processors."""
    with torch.no_grad():
        return pipe.unet(*batch).sample


def forward(unet, batch):
    with torch.no_grad():
        return unet(*batch).sample


def processors_snapshot(unet):
    return {name: (type(p), p) for name, p in unet.attn_processors.items()}


def assert_restored(unet, before):
    after = processors_snapshot(unet)
    assert after.keys() == before.keys()
    for name, (kind, proc) in before.items():
        assert after[name][0] is kind, name
        assert after[name][1] is proc, name


def test_unet_has_cross_attention_everywhere(pipe):
    names = [n for n in pipe.unet.attn_processors if is_cross_attention(n)]
    for block in ("down_blocks.", "mid_block.", "up_blocks."):
        assert any(n.startswith(block) for n in names), block
    assert all(".attn2." in n for n in names)
    assert any(".attn1." in n for n in pipe.unet.attn_processors)


def test_baseline_depends_on_context(pipe, batch, baseline):
    # Otherwise the prompt tests below would prove nothing.
    latents, timesteps, context = batch
    swapped = forward(pipe.unet, (latents, timesteps, context.flip(0)))
    assert not torch.allclose(swapped, baseline, atol=1e-4)


def test_torch_backend_matches_diffusers(pipe, batch, baseline):
    before = processors_snapshot(pipe.unet)
    with backend_processors(pipe.unet, "torch"):
        procs = pipe.unet.attn_processors
        for name, proc in procs.items():
            if is_cross_attention(name):
                assert isinstance(proc, CrossAttentionProcessor) and proc.backend == "torch" and proc.prompt is None
            else:
                assert proc is before[name][1], name
        out = forward(pipe.unet, batch)
    assert_restored(pipe.unet, before)
    assert out.shape == baseline.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out, baseline, **TOL)


def test_auto_backend_keeps_diffusers_processors(pipe, batch, baseline):
    before = processors_snapshot(pipe.unet)
    with backend_processors(pipe.unet, "auto"):
        assert_restored(pipe.unet, before)
        torch.testing.assert_close(forward(pipe.unet, batch), baseline, rtol=0, atol=0)


def test_processors_restored_after_an_error(pipe):
    before = processors_snapshot(pipe.unet)
    with pytest.raises(RuntimeError, match="boom"):
        with backend_processors(pipe.unet, "torch"):
            raise RuntimeError("boom")
    assert_restored(pipe.unet, before)


def test_duplicated_context_as_concat_prompt_changes_nothing(pipe, batch, baseline):
    _, _, context = batch
    prompt = LearnedPrompt("concat", 3 * context.shape[1], context.shape[2], init=context[0].repeat(3, 1))
    assert prompt.tokens.shape == (3 * 77, context.shape[2])
    before = processors_snapshot(pipe.unet)
    with prompt_processors(pipe.unet, prompt, "all", backend="torch"):
        with prompt.active(0):
            both = forward(pipe.unet, batch)
        with prompt.active(1):
            second = forward(pipe.unet, batch)
        off = forward(pipe.unet, batch)
    assert_restored(pipe.unet, before)
    assert prompt.active_from is None
    # Item 0's prompt repeats its own keys and values: the softmax over them is unchanged.
    torch.testing.assert_close(both[0], baseline[0], **TOL)
    # Item 1 attends to item 0's keys too.
    assert not torch.allclose(both[1], baseline[1], atol=1e-4)
    # active(1): item 0 sees no prompt, item 1 does.
    torch.testing.assert_close(second[0], baseline[0], **TOL)
    torch.testing.assert_close(second[1], both[1], **TOL)
    assert not torch.allclose(second[1], baseline[1], atol=1e-4)
    # Outside active() the prompt is off.
    torch.testing.assert_close(off, baseline, **TOL)


def test_active_nests_and_restores():
    prompt = LearnedPrompt("concat", 2, 4)
    assert prompt.active_from is None
    with prompt.active(0):
        assert prompt.active_from == 0
        with prompt.active(3):
            assert prompt.active_from == 3
        assert prompt.active_from == 0
    assert prompt.active_from is None


def test_additive_zero_prompt_changes_nothing(pipe, batch, baseline):
    _, _, context = batch
    prompt = LearnedPrompt("additive", context.shape[1], context.shape[2])
    assert not prompt.tokens.any()
    with prompt_processors(pipe.unet, prompt, "all", backend="torch"), prompt.active(0):
        out = forward(pipe.unet, batch)
    torch.testing.assert_close(out, baseline, **TOL)


def test_additive_prompt_acts_on_active_items_only(pipe, batch, baseline):
    _, _, context = batch
    init = torch.randn(context.shape[1], context.shape[2], generator=torch.Generator().manual_seed(1))
    prompt = LearnedPrompt("additive", context.shape[1], context.shape[2], init=init)
    with prompt_processors(pipe.unet, prompt, "all", backend="torch"), prompt.active(1):
        out = forward(pipe.unet, batch)
    torch.testing.assert_close(out[0], baseline[0], **TOL)
    assert not torch.allclose(out[1], baseline[1], atol=1e-4)


def test_prompt_receives_gradients(pipe, batch):
    _, _, context = batch
    prompt = LearnedPrompt("concat", 4, context.shape[2], init=torch.randn(4, context.shape[2]))
    with prompt_processors(pipe.unet, prompt, "mid", backend="torch"), prompt.active(0):
        out = pipe.unet(*batch).sample
    (grad,) = torch.autograd.grad(out.square().sum(), [prompt.tokens])
    assert grad.shape == prompt.tokens.shape and grad.abs().sum() > 0


def test_bad_prompt_mode_and_site(pipe):
    with pytest.raises(ValueError):
        LearnedPrompt("bogus", 2, 4)
    prompt = LearnedPrompt("concat", 2, 4)
    before = processors_snapshot(pipe.unet)
    with pytest.raises(ValueError):
        with prompt_processors(pipe.unet, prompt, "bogus"):
            pass
    assert_restored(pipe.unet, before)


@pytest.mark.parametrize(
    "inject, sites",
    [("mid", ("mid_block.",)), ("mid_up", ("mid_block.", "up_blocks.")), ("all", ("down_blocks.", "mid_block.", "up_blocks."))],
)
def test_prompt_goes_only_to_its_sites(pipe, inject, sites):
    prompt = LearnedPrompt("concat", 2, pipe.unet.config.cross_attention_dim)
    before = processors_snapshot(pipe.unet)
    with prompt_processors(pipe.unet, prompt, inject, backend="torch"):
        carrying = []
        for name, proc in pipe.unet.attn_processors.items():
            if ".attn2." in name:
                assert isinstance(proc, CrossAttentionProcessor), name
                assert proc.backend == "torch"
                if name.startswith(sites):
                    assert proc.prompt is prompt, name
                    carrying.append(name)
                else:
                    assert proc.prompt is None, name
            else:
                # Self-attention keeps diffusers' processor.
                assert ".attn1." in name
                assert type(proc) is before[name][0] and proc is before[name][1], name
        assert carrying
        if inject == "mid":
            assert all(n.startswith("mid_block.") for n in carrying)
    assert_restored(pipe.unet, before)


def test_mid_prompt_changes_output_only_through_mid_block(pipe, batch, baseline):
    _, _, context = batch
    prompt = LearnedPrompt("concat", 8, context.shape[2], init=torch.randn(8, context.shape[2], generator=torch.Generator().manual_seed(2)))
    with prompt_processors(pipe.unet, prompt, "mid", backend="torch"), prompt.active(0):
        mid = forward(pipe.unet, batch)
    assert not torch.allclose(mid, baseline, atol=1e-4)
    # With the prompt nowhere (a processor factory that injects nothing), the output is diffusers'.
    with cross_attention_processors(pipe.unet, lambda name: CrossAttentionProcessor("torch", None)):
        torch.testing.assert_close(forward(pipe.unet, batch), baseline, **TOL)


def test_processor_refuses_self_attention_and_masks(pipe):
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    proc = CrossAttentionProcessor("torch")
    hidden = torch.randn(1, 4, attn.to_q.in_features)
    with pytest.raises(ValueError):
        proc(attn, hidden, None)
    with pytest.raises(ValueError):
        proc(attn, hidden, torch.randn(1, 77, attn.to_k.in_features), attention_mask=torch.zeros(1, 4, 77))


def circle_capture(pipe, masks=None) -> AttentionCapture:
    prompts = ["a photo of a circle", "a blue square on a striped background"]
    return AttentionCapture(token_columns(pipe.tokenizer, prompts, ["circle", "square"]), masks)


def test_capture_leaves_the_output_unchanged(pipe, batch, baseline):
    capture = circle_capture(pipe)
    with capture_processors(pipe.unet, capture, "torch"):
        out = forward(pipe.unet, batch)
    torch.testing.assert_close(out, baseline, **TOL)
    layers = [n for n in pipe.unet.attn_processors if is_cross_attention(n)]
    assert len(capture.stats) == len(layers), "one record per cross-attention layer, none for self-attention"
    assert capture.watched_sq().shape == (2,) and torch.all(capture.watched_sq() > 0)


def test_capture_masks_restrict_the_rows(pipe, batch):
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, :16] = 1  # item 0: top half; item 1: nothing
    full, half = circle_capture(pipe), circle_capture(pipe, masks)
    with capture_processors(pipe.unet, full, "torch"), torch.no_grad():
        pipe.unet(*batch)
    with capture_processors(pipe.unet, half, "torch"), torch.no_grad():
        pipe.unet(*batch)
    assert half.watched_sq()[1] == 0
    assert 0 < half.watched_sq()[0] < full.watched_sq()[0]
    # Each row's probabilities sum to 1, so the column mass counts the rows: every layer's query
    # grid saw half the rows of item 0.
    for layer, (masked, whole) in enumerate(zip(half.stats, full.stats)):
        torch.testing.assert_close(2 * masked.column_mass[0].sum(-1), whole.column_mass[0].sum(-1), msg=f"layer {layer}")


def test_capture_loss_trains_cross_attention(pipe, batch):
    capture = circle_capture(pipe)
    to_k = next(p for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    to_k.requires_grad_(True)
    try:
        with capture_processors(pipe.unet, capture, "torch"):
            pipe.unet(*batch)
        (grad,) = torch.autograd.grad(capture.watched_sq().sum(), [to_k])
    finally:
        to_k.requires_grad_(False)
    assert grad.abs().sum() > 0


def test_a_layer_cannot_both_carry_a_prompt_and_capture(pipe):
    prompt = LearnedPrompt("concat", 77, pipe.text_encoder.config.hidden_size)
    with pytest.raises(ValueError):
        CrossAttentionProcessor("torch", prompt, circle_capture(pipe))
