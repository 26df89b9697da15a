"""cross_attention: the plain-PyTorch reference against float64 hand computation, and the dispatcher."""

import pytest
import torch

from fasterase.errors import UserError
from fasterase.kernels import (
    BACKEND_NAMES,
    BackendUnavailable,
    Capture,
    backend_status,
    cross_attention,
    cross_attention_reference,
)

B, H, MQ, MK, MP = 2, 3, 37, 77, 154


def inputs(d: int, prompt: bool, dtype=torch.float32, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)

    q, k, v = randn(B, H, MQ, d), randn(B, H, MK, d), randn(B, H, MK, d)
    if not prompt:
        return q, k, v, None, None
    return q, k, v, randn(H, MP, d), randn(H, MP, d)


def attention64(q, k, v, prompt_k=None, prompt_v=None, scale=None):
    """softmax(q k^T * scale) v in float64, by hand."""
    q, k, v = q.double(), k.double(), v.double()
    if prompt_k is not None:
        k = torch.cat([k, prompt_k.double().unsqueeze(0).expand(q.shape[0], -1, -1, -1)], dim=2)
        v = torch.cat([v, prompt_v.double().unsqueeze(0).expand(q.shape[0], -1, -1, -1)], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("prompt", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_values(d, prompt, scale):
    q, k, v, pk, pv = inputs(d, prompt)
    out = cross_attention_reference(q, k, v, pk, pv, scale)
    assert out.shape == (B, H, MQ, d) and out.dtype == torch.float32
    expected = attention64(q, k, v, pk, pv, scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [40, 80])
def test_prompt_is_concatenation_on_the_key_axis(d):
    q, k, v, pk, pv = inputs(d, prompt=True, seed=1)
    with_prompt = cross_attention_reference(q, k, v, pk, pv)
    k_cat = torch.cat([k, pk.expand(B, -1, -1, -1)], dim=2)
    v_cat = torch.cat([v, pv.expand(B, -1, -1, -1)], dim=2)
    explicit = cross_attention_reference(q, k_cat, v_cat)
    torch.testing.assert_close(with_prompt, explicit, rtol=1e-6, atol=1e-6)
    # A prompt does change the output (its keys take part in the softmax).
    assert not torch.allclose(with_prompt, cross_attention_reference(q, k, v), atol=1e-3)


def test_duplicated_keys_do_not_change_attention():
    q, k, v, _, _ = inputs(40, prompt=False, seed=2)
    # The prompt is batch-shared, so use B=1 and the item's own keys as the prompt.
    q, k, v = q[:1], k[:1], v[:1]
    out = cross_attention_reference(q, k, v, k[0].repeat(1, 3, 1), v[0].repeat(1, 3, 1))
    torch.testing.assert_close(out, cross_attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def probs64(q, k, prompt_k=None, scale=None):
    """The attention matrix in float64, by hand: (B, H, Mq, Mk [+ Mp])."""
    q, k = q.double(), k.double()
    if prompt_k is not None:
        k = torch.cat([k, prompt_k.double().unsqueeze(0).expand(q.shape[0], -1, -1, -1)], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale, dim=-1)


def watched_columns() -> torch.Tensor:
    """Different watched columns per item, as SD prompts put the concept in different places."""
    columns = torch.zeros(B, MK, dtype=torch.bool)
    columns[0, [5, 6]] = True
    columns[1, [2, 40, 76]] = True
    return columns


def row_weights() -> torch.Tensor:
    rows = torch.zeros(B, MQ)
    rows[0, :20] = 1
    rows[1] = torch.linspace(0, 1, MQ)
    return rows


@pytest.mark.parametrize("prompt", [False, True])
@pytest.mark.parametrize("with_rows", [False, True])
def test_capture_statistics(prompt, with_rows):
    q, k, v, pk, pv = inputs(40, prompt, seed=9)
    columns, rows = watched_columns(), row_weights() if with_rows else None
    out, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=Capture(columns, rows), backend="torch")
    torch.testing.assert_close(out, cross_attention_reference(q, k, v, pk, pv))
    text = probs64(q, k, pk)[..., :MK]  # prompt columns are never watched
    weights = (torch.ones(B, MQ) if rows is None else rows).double()[:, None, :, None]
    column_mass = (text * weights).sum(2)
    column_sq = (text.square() * weights).sum(2)
    watched_sq = (column_sq * columns[:, None, :]).sum(-1)
    for name, got, expected in (("column_mass", stats.column_mass, column_mass), ("column_sq", stats.column_sq, column_sq), ("watched_sq", stats.watched_sq, watched_sq)):
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert stats.maps is None


def test_capture_maps_by_column_index():
    q, k, v, _, _ = inputs(40, prompt=False, seed=10)
    index = torch.tensor([[5, 6, -1], [2, 40, 76]])
    _, stats = cross_attention(q, k, v, capture=Capture(index, maps=True), backend="torch")
    text = probs64(q, k)
    assert stats.maps.shape == (B, H, MQ, 3)
    torch.testing.assert_close(stats.maps[0, :, :, :2].double(), text[0, :, :, [5, 6]])
    assert torch.all(stats.maps[0, :, :, 2] == 0), "an unused slot holds zeros"
    torch.testing.assert_close(stats.maps[1].double(), text[1][..., [2, 40, 76]])
    # Indices and the boolean mask watch the same columns.
    _, by_mask = cross_attention(q, k, v, capture=Capture(watched_columns()), backend="torch")
    torch.testing.assert_close(stats.watched_sq, by_mask.watched_sq)


@pytest.mark.parametrize("prompt", [False, True])
def test_gradients_flow_through_the_statistics(prompt):
    q, k, v, pk, pv = inputs(40, prompt, seed=11, requires_grad=True)
    leaves = [t for t in (q, k, pk) if t is not None]
    columns, rows = watched_columns(), row_weights()
    _, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=Capture(columns, rows), backend="torch")
    loss = stats.watched_sq.sum() + 0.5 * stats.column_mass[..., 3].sum()
    grads = torch.autograd.grad(loss, leaves)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    text = probs64(leaves64[0], leaves64[1], leaves64[2] if prompt else None)[..., :MK]
    weights = rows.double()[:, None, :, None]
    loss64 = ((text.square() * weights).sum(2) * columns[:, None, :]).sum() + 0.5 * (text * weights).sum(2)[..., 3].sum()
    for g, g64 in zip(grads, torch.autograd.grad(loss64, leaves64)):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5 * g64.abs().max().item())


def test_bad_capture_requests():
    q, k, v, _, _ = inputs(40, prompt=False)
    bad = [
        Capture(torch.zeros(B, MK - 1, dtype=torch.bool)),  # columns must cover the text keys
        Capture(torch.zeros(B + 1, MK, dtype=torch.bool)),  # one row per batch item
        Capture(torch.zeros(B, MK)),  # float columns
        Capture(watched_columns(), rows=torch.ones(B, MQ + 1)),  # rows must cover the queries
        Capture(watched_columns(), maps=True),  # maps need indices
    ]
    for capture in bad:
        with pytest.raises(ValueError):
            cross_attention(q, k, v, capture=capture, backend="torch")


@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("prompt", [False, True])
def test_reference_gradients(d, prompt):
    q, k, v, pk, pv = inputs(d, prompt, seed=3, requires_grad=True)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grad_out = torch.randn(B, H, MQ, d, generator=torch.Generator().manual_seed(4))

    out = cross_attention_reference(q, k, v, pk, pv)
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    args64 = leaves64 + [None, None] if not prompt else leaves64
    out64 = attention64(*args64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())

    names = ["q", "k", "v", "prompt_k", "prompt_v"]
    for name, g, g64 in zip(names, grads, grads64):
        assert g.dtype == torch.float32 and g.shape == g64.shape, name
        # fp32 accumulation over up to 231 keys: relative to the gradient's own size.
        tol = 1e-5 * g64.abs().max().item()
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prompt", [False, True])
def test_low_precision_dtype_and_error(dtype, prompt):
    q, k, v, pk, pv = inputs(40, prompt, dtype=dtype, seed=5)
    out = cross_attention_reference(q, k, v, pk, pv)
    assert out.dtype == dtype and out.shape == (B, H, MQ, 40)
    exact = attention64(q, k, v, pk, pv)
    # flash-attention's rule: at most twice the error of plain PyTorch in the same precision.
    if prompt:
        k_cat, v_cat = torch.cat([k, pk.expand(B, -1, -1, -1)], 2), torch.cat([v, pv.expand(B, -1, -1, -1)], 2)
    else:
        k_cat, v_cat = k, v
    plain = torch.softmax(q @ k_cat.transpose(-1, -2) * 40**-0.5, dim=-1) @ v_cat
    assert plain.dtype == dtype
    err = (out.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    assert err <= 2 * plain_err, (err, plain_err)


def test_prompt_in_another_dtype():
    q, k, v, pk, pv = inputs(40, prompt=True, dtype=torch.float16, seed=6)
    out = cross_attention_reference(q, k, v, pk.float(), pv.float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, cross_attention_reference(q, k, v, pk, pv))


@pytest.mark.parametrize("prompt", [False, True])
def test_auto_backend_runs_on_cpu(prompt):
    q, k, v, pk, pv = inputs(40, prompt, seed=8)
    out = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, backend="auto")
    torch.testing.assert_close(out.double(), attention64(q, k, v, pk, pv), rtol=1e-5, atol=1e-5)
    out = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv)
    torch.testing.assert_close(out.double(), attention64(q, k, v, pk, pv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forced_backend_on_cpu_lists_its_reasons(backend, monkeypatch):
    # The tests run Triton's interpreter, with which a forced triton runs on the CPU; not without it.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert issubclass(BackendUnavailable, UserError)
    q, k, v, _, _ = inputs(40, prompt=False)
    with pytest.raises(BackendUnavailable) as err:
        cross_attention(q, k, v, backend=backend)
    message = str(err.value)
    assert "\n" not in message
    assert backend in message
    assert "cpu" in message
    # The same reasons backend_status gives for this machine's default device (the CPU here).
    if not torch.cuda.is_available():
        status = backend_status()["cross_attention"][backend]
        assert status.startswith("unavailable, because ")
        for reason in status[len("unavailable, because "):].split("; "):
            assert reason in message


@pytest.mark.parametrize("backend", ["bogus", "Torch", "", "xformers"])
def test_unknown_backend(backend):
    q, k, v, _, _ = inputs(40, prompt=False)
    with pytest.raises(BackendUnavailable) as err:
        cross_attention(q, k, v, backend=backend)
    assert repr(backend) in str(err.value)
    assert "torch" in str(err.value)


def test_shape_mismatches():
    q, k, v, pk, pv = inputs(40, prompt=True)
    bad = [
        dict(q=q[0], k=k, v=v),  # q not 4-d
        dict(q=q, k=k, v=v[:, :, :10]),  # k and v differ
        dict(q=q, k=k[:1], v=v[:1]),  # batch
        dict(q=q, k=k[:, :2], v=v[:, :2]),  # heads
        dict(q=q, k=k[..., :32], v=v[..., :32]),  # head dim
        dict(q=q, k=k, v=v, prompt_k=pk),  # prompt_v missing
        dict(q=q, k=k, v=v, prompt_v=pv),  # prompt_k missing
        dict(q=q, k=k, v=v, prompt_k=pk[:2], prompt_v=pv[:2]),  # prompt heads
        dict(q=q, k=k, v=v, prompt_k=pk[..., :32], prompt_v=pv[..., :32]),  # prompt head dim
        dict(q=q, k=k, v=v, prompt_k=pk, prompt_v=pv[:, :10]),  # prompt_k and prompt_v differ
    ]
    for kwargs in bad:
        q_, k_, v_ = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
        with pytest.raises(ValueError):
            cross_attention(q_, k_, v_, backend="torch", **kwargs)


def test_backend_status():
    status = backend_status()
    assert "cross_attention" in status
    entry = status["cross_attention"]
    assert set(entry) == set(BACKEND_NAMES)
    assert entry["torch"] == "available"
    for name, value in entry.items():
        assert value == "available" or value.startswith("unavailable, because "), (name, value)
