"""The torch backend (PyTorch's fused attention without a capture) against the reference: values
and gradients, in every dtype, with and without a prompt."""

import pytest
import torch

from fasterase.kernels import Capture, cross_attention, cross_attention_reference
from fasterase.kernels.cross_attention_torch import cross_attention_torch

from test_cross_attention import B, H, MK, MQ, attention64, inputs, watched_columns


@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("prompt", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_values_and_gradients_match_the_reference(d, prompt, scale):
    q, k, v, pk, pv = inputs(d, prompt, seed=7, requires_grad=True)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grad_out = torch.randn(B, H, MQ, d, generator=torch.Generator().manual_seed(12))
    out = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, scale=scale, backend="torch")
    expected = cross_attention_reference(q, k, v, pk, pv, scale)
    assert out.dtype == torch.float32 and out.shape == (B, H, MQ, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for name, g, g_ref in zip(["q", "k", "v", "prompt_k", "prompt_v"], grads, expected_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prompt", [False, True])
def test_low_precision_error_is_the_references(dtype, prompt):
    q, k, v, pk, pv = inputs(40, prompt, dtype=dtype, seed=5)
    out = cross_attention_torch(q, k, v, pk, pv)
    assert out.dtype == dtype
    exact = attention64(q, k, v, pk, pv)
    err = (out.double() - exact).abs().max().item()
    reference_err = (cross_attention_reference(q, k, v, pk, pv).double() - exact).abs().max().item()
    # The reference computes in float32 and rounds once; the fused kernel may round P before P V.
    assert err <= 4 * reference_err, (err, reference_err)


def test_prompt_and_text_in_other_dtypes():
    q, k, v, pk, pv = inputs(40, prompt=True, dtype=torch.float16, seed=6)
    out = cross_attention_torch(q, k.float(), v.float(), pk.float(), pv.float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, cross_attention_torch(q, k, v, pk, pv))


@pytest.mark.parametrize("prompt", [False, True])
def test_a_capture_gets_the_references_statistics(prompt):
    q, k, v, pk, pv = inputs(40, prompt, seed=9)
    capture = Capture(watched_columns())
    out, stats = cross_attention_torch(q, k, v, pk, pv, None, capture)
    expected_out, expected = cross_attention_reference(q, k, v, pk, pv, None, capture)
    assert torch.equal(out, expected_out)
    assert torch.equal(stats.watched_sq, expected.watched_sq) and stats.column_mass.shape == (B, H, MK)
