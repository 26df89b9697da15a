"""cross_attention's Triton backend against the plain-PyTorch reference: outputs, log-sum-exp,
statistics, maps and every gradient, in fp32 tightly and in fp16/bf16 by the twice-the-torch-error
rule; the custom op under opcheck; dispatch; one FMN step on the tiny pipeline.

Where CUDA is available the compiled kernels run on CUDA tensors, and SD1.x-sized cases run too;
elsewhere tests/conftest.py sets TRITON_INTERPRET=1 and Triton's interpreter runs the kernels on
CPU tensors."""

import pytest
import torch

import fasterase.kernels.cross_attention_triton as triton_cross_attention
from fasterase.kernels import BackendUnavailable, Capture, cross_attention, cross_attention_reference
from fasterase.kernels.cross_attention_torch import cross_attention_torch
from fasterase.kernels.dispatch import implementation

# The interpreter runs the kernels on CPU tensors; compiled, they take CUDA tensors only.
DEVICE = "cpu" if triton_cross_attention.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU", allow_module_level=True)
# GPU-sized shapes, which would take minutes under the interpreter, and GPU-only behaviour.
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="runs the compiled kernels on a CUDA GPU (too slow or impossible under the interpreter)")

B, H, MK, MP = 2, 2, 77, 154
INDEX = torch.tensor([[5, 6, -1], [2, 40, 76]], device=DEVICE)  # different columns per item, one unused slot


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fresh outputs start as NaN: any region a kernel leaves unwritten fails the comparisons."""
    monkeypatch.setattr(triton_cross_attention, "POISON", True)


@pytest.fixture(autouse=True)
def ieee_float32():
    """fp32 comparisons are exact-arithmetic ones on CUDA too: the kernels multiply fp32 tiles in
    fp32 (input_precision "ieee", not TF32), and torch's references here must not use TF32 either
    (matrix products, and cuDNN's convolutions in the FMN step's UNet)."""
    # Not monkeypatch: these flags are computed attributes, which pytest 9.2's monkeypatch records
    # as missing and then fails to delete on teardown.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randn(*shape, gen: torch.Generator, device: str = DEVICE) -> torch.Tensor:
    """Drawn on the CPU, so that a seed gives the same numbers on every device."""
    return torch.randn(*shape, generator=gen).to(device)


def inputs(mq: int, d: int, mp: int, dtype=torch.float32, seed: int = 0, requires_grad: bool = False, heads: int = H, device: str = DEVICE):
    """q, k, v, prompt_k, prompt_v as the processors make them: head-split views of (B, M, H*D)."""
    gen = torch.Generator().manual_seed(seed)

    def split(*shape):  # (..., M, H, D) -> (..., H, M, D), a strided view
        x = randn(*shape, gen=gen, device=device).to(dtype).transpose(-3, -2)
        return x.requires_grad_(requires_grad) if requires_grad else x

    q, k, v = split(B, mq, heads, d), split(B, MK, heads, d), split(B, MK, heads, d)
    if not mp:
        return q, k, v, None, None
    return q, k, v, split(mp, heads, d), split(mp, heads, d)


def capture_for(mq: int, columns: str, with_rows: bool) -> Capture:
    rows = torch.rand(B, mq, generator=torch.Generator().manual_seed(1)).to(DEVICE) if with_rows else None
    if columns == "index":
        return Capture(INDEX, rows, maps=True)
    mask = torch.zeros(B, MK, dtype=torch.bool, device=DEVICE)
    mask[0, [5, 6]] = True
    mask[1, [2, 40, 76]] = True
    return Capture(mask, rows)


def logits64(q, k, prompt_k, scale):
    """(B, H, Mq, Mk [+ Mp]) scores in float64, by hand."""
    q, k = q.double(), k.double()
    if prompt_k is not None:
        k = torch.cat([k, prompt_k.double().expand(q.shape[0], -1, -1, -1)], dim=2)
    return q @ k.transpose(-1, -2) * scale


def close(got, expected, name, rtol=1e-5):
    """fp32 against fp32: relative to each tensor's own size, as sums over ~200 keys round."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mq, d, mp, columns, with_rows", [
    (37, 40, 0, "index", True),
    (50, 40, MP, "mask", False),
    (37, 80, MP, "mask", True),
    (50, 80, 0, "index", False),
    # On a GPU a query tile is 64 rows: several tiles and a ragged last one; and the largest
    # float32 head dim compiled kernels take (SD1.x's 160 runs in fp16/bf16 below), with a
    # 770-key prompt.
    pytest.param(200, 40, MP, "index", True, marks=cuda_only),
    pytest.param(64, 128, 770, "index", True, marks=cuda_only),
])
def test_forward_matches_reference(mq, d, mp, columns, with_rows):
    q, k, v, pk, pv = inputs(mq, d, mp, seed=mq + d + mp)
    capture = capture_for(mq, columns, with_rows)
    out, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=capture, backend="triton")
    expected_out, expected = cross_attention_reference(q, k, v, pk, pv, None, capture)
    close(out, expected_out, "out")
    for name in ("watched_sq", "column_mass", "column_sq", "maps"):
        if getattr(expected, name) is None:
            assert getattr(stats, name) is None, name
        else:
            close(getattr(stats, name), getattr(expected, name), name)
    # Without capture: the same output, and the saved row log-sum-exp is the softmax's normaliser
    # over text and prompt keys.
    scale = d**-0.5
    plain, lse, column_mass, _, maps = torch.ops.fasterase.cross_attention_triton(q, k, v, pk, pv, scale, False, None, None)
    assert plain.equal(out), "capture does not change the output"
    assert column_mass.shape == (B, H, 0) and maps.shape == (B, H, mq, 0)
    close(lse.double(), torch.logsumexp(logits64(q, k, pk, scale), -1), "lse", rtol=1e-6)


def loss_terms(seed: int, mq: int, d: int):
    """One scalar per gradient path, each with its own random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    g_out, g_stats, g_maps = randn(B, H, mq, d, gen=gen), randn(B, H, MK, gen=gen), randn(B, H, mq, 3, gen=gen)
    return {
        "out": lambda out, stats: (out * g_out).sum(),
        "column_mass": lambda out, stats: (stats.column_mass * g_stats).sum(),
        "column_sq": lambda out, stats: (stats.column_sq * g_stats).sum(),
        "watched_sq": lambda out, stats: stats.watched_sq.sum(),
        "maps": lambda out, stats: (stats.maps * g_maps).sum(),
    }


GRADIENT_CASES = [
    *[(37, 40, MP, "index", True, path) for path in ("out", "column_mass", "column_sq", "watched_sq", "maps")],
    *[(50, 80, 0, "mask", False, path) for path in ("out", "column_sq", "watched_sq")],
    # Key gradients summed with atomics over several query tiles (GPU tiles are 64 rows); the
    # largest float32 head dim.
    *[pytest.param(200, 40, MP, "index", True, path, marks=cuda_only) for path in ("out", "column_sq", "maps")],
    *[pytest.param(64, 128, 770, "index", True, path, marks=cuda_only) for path in ("out", "column_sq", "maps")],
]


@pytest.mark.parametrize("mq, d, mp, columns, with_rows, path", GRADIENT_CASES)
def test_gradients_match_reference(mq, d, mp, columns, with_rows, path):
    capture = capture_for(mq, columns, with_rows)
    loss = loss_terms(7, mq, d)[path]
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [t for t in inputs(mq, d, mp, seed=3, requires_grad=True) if t is not None]
        out, stats = cross_attention(*leaves[:3], prompt_k=leaves[3] if mp else None, prompt_v=leaves[4] if mp else None, capture=capture, backend=backend)
        # The statistics do not depend on v: the reference's graph then leaves it out.
        grads[backend] = torch.autograd.grad(loss(out, stats), leaves, allow_unused=True, materialize_grads=True)
    for name, got, expected in zip(("q", "k", "v", "prompt_k", "prompt_v"), grads["triton"], grads["torch"]):
        close(got, expected, f"d{name} through {path}")
    if path != "out":
        assert all(g.abs().max() == 0 for g in grads["triton"][2::2]), "the statistics do not depend on v"


# (heads, queries, head dim, prompt keys); the GPU cases are SD1.x's largest and smallest layers.
LOW_PRECISION_SHAPES = [
    pytest.param(H, 37, 40, MP, id="37x40-prompt"),
    pytest.param(8, 4096, 40, 0, marks=cuda_only, id="sd1-4096x40"),
    pytest.param(8, 4096, 40, 770, marks=cuda_only, id="sd1-4096x40-prompt770"),
    pytest.param(8, 64, 160, 770, marks=cuda_only, id="sd1-64x160-prompt770"),
]


@pytest.mark.parametrize("heads, mq, d, mp", LOW_PRECISION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_the_torch_error(dtype, heads, mq, d, mp):
    """flash-attention's rule: against an exact computation from the same rounded inputs, the
    kernel's error is at most twice that of plain PyTorch in the same dtype, for the output, the
    statistics and every gradient (a floor of 1e-6 covers exact zeros)."""
    capture = capture_for(mq, "index", with_rows=True)
    gen = torch.Generator().manual_seed(11)
    g_out, g_sq = randn(B, heads, mq, d, gen=gen), randn(B, heads, MK, gen=gen)

    def run(leaves, attention):
        out, column_sq, maps = attention(*leaves)
        loss = (out.double() * g_out).sum() + (column_sq.double() * g_sq).sum() + maps.double().sum()
        return [out, column_sq, maps, *torch.autograd.grad(loss, leaves)]

    def triton_attention(q, k, v, pk=None, pv=None):
        out, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=capture, backend="triton")
        return out, stats.column_sq, stats.maps

    def with_prompt(text, prompt):
        return text if prompt is None else torch.cat([text, prompt.expand(B, -1, -1, -1)], 2)

    def plain_attention(q, k, v, pk=None, pv=None):  # every step in q's dtype
        probs = torch.softmax(q @ with_prompt(k, pk).transpose(-1, -2) * d**-0.5, -1)
        out = probs @ with_prompt(v, pv)
        text = probs[..., :MK]
        rows = capture.rows.to(q.dtype)[:, None, :, None]
        maps = text.gather(3, INDEX.clamp(min=0)[:, None, None, :].expand(-1, heads, mq, -1)) * (INDEX >= 0)[:, None, None, :]
        return out, (text.square() * rows).sum(2), maps

    rounded = [t for t in inputs(mq, d, mp, dtype=dtype, seed=12, heads=heads) if t is not None]
    results = {}
    for name, attention, kind in (("triton", triton_attention, dtype), ("plain", plain_attention, dtype), ("exact", plain_attention, torch.float64)):
        results[name] = run([t.detach().to(kind).requires_grad_(True) for t in rounded], attention)
    names = ("out", "column_sq", "maps", "dq", "dk", "dv", "dprompt_k", "dprompt_v")
    assert len(results["triton"]) == 3 + len(rounded)
    for name, got, plain, exact in zip(names, results["triton"], results["plain"], results["exact"]):
        assert got.dtype == (dtype if name not in ("column_sq", "maps") else torch.float32), name
        err = (got.double() - exact).abs().max().item()
        plain_err = (plain.double() - exact).abs().max().item()
        assert err <= 2 * plain_err + 1e-6, (name, err, plain_err)


def test_maps_gather_the_watched_columns():
    # plain gather in the reference; an index picks one column of a tile in the kernel.
    q, k, v, _, _ = inputs(37, 40, 0, seed=4)
    _, stats = cross_attention(q, k, v, capture=Capture(INDEX, maps=True), backend="triton")
    probs = torch.softmax(logits64(q, k, None, 40**-0.5), -1)
    torch.testing.assert_close(stats.maps[1].double(), probs[1][..., [2, 40, 76]])
    assert torch.all(stats.maps[0, ..., 2] == 0), "an unused slot holds zeros"


@pytest.mark.parametrize("prompt, capture", [(False, False), (True, True)])
def test_opcheck(prompt, capture):
    # One batch item and head (opcheck runs the op many times); two query tiles under the interpreter.
    q, k, v, pk, pv = (t[:1, :1] if t.dim() == 4 else t[:1] for t in inputs(40, 40, 30, seed=5) if t is not None)
    q, k, v, pk, pv = (t.detach().requires_grad_(True) for t in (q, k, v, pk, pv))
    rows = torch.rand(1, 40, generator=torch.Generator().manual_seed(6)).to(DEVICE) if capture else None
    index = INDEX[1:] if capture else None
    args = (q, k, v, pk if prompt else None, pv if prompt else None, 0.3, capture, rows, index)
    torch.library.opcheck(torch.ops.fasterase.cross_attention_triton.default, args)


def test_opcheck_backward():
    q, k, v, pk, pv = (t[:1, :1] if t.dim() == 4 else t[:1] for t in inputs(40, 40, 30, seed=8))
    gen = torch.Generator().manual_seed(9)
    out, lse, *_ = torch.ops.fasterase.cross_attention_triton(q, k, v, pk, pv, 0.3, False, None, None)
    grads = (randn(*out.shape, gen=gen), randn(1, 1, MK, gen=gen), randn(1, 1, MK, gen=gen), randn(1, 1, 40, 3, gen=gen))
    rows = torch.rand(1, 40, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.fasterase.cross_attention_triton_backward.default, (*grads, q, k, v, pk, pv, out, lse, 0.3, rows, INDEX[1:]))


def test_compiles_as_one_graph():
    """torch.compile traces the public call, dispatch included, around the custom op."""
    q, k, v, pk, pv = inputs(40, 40, 30, seed=10)
    leaves = [t.detach().requires_grad_(True) for t in (q[:1], k[:1], v[:1], pk, pv)]
    capture = Capture(capture_for(40, "mask", False).columns[:1])

    def loss(q, k, v, pk, pv):
        out, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=capture, backend="triton")
        return out.sum() + stats.watched_sq.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves)
    eager = loss(*leaves)
    assert compiled.equal(eager)
    for got, expected in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        assert got.equal(expected)


def test_forced_triton_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, _, _ = inputs(37, 40, 0, device="cpu")
    with pytest.raises(BackendUnavailable) as err:
        cross_attention(q, k, v, backend="triton")
    message = str(err.value)
    assert "\n" not in message and "CUDA tensors" in message and "cpu" in message and "TRITON_INTERPRET=1" in message


def test_auto_leaves_the_interpreter_alone():
    q, k, v, _, _ = inputs(37, 40, 0, device="cpu")
    assert implementation("cross_attention", "auto", q, (q, k, v, None, None, None, None)) is cross_attention_torch
    assert not isinstance(cross_attention(q, k, v), tuple)


@cuda_only
def test_auto_takes_triton_for_cuda_tensors():
    q, k, v, _, _ = inputs(37, 40, 0)
    assert implementation("cross_attention", "auto", q, (q, k, v, None, None, None, None)) is not cross_attention_torch
    torch.testing.assert_close(cross_attention(q, k, v), cross_attention_reference(q, k, v))


@pytest.mark.parametrize("change, reason", [
    (lambda q, k, v: (q, k.repeat(1, 1, 2, 1)[:, :, :130], v.repeat(1, 1, 2, 1)[:, :, :130]), "text keys in one tile"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "not torch.float64"),
    (lambda q, k, v: (q, k.half(), v.half()), "one dtype"),
    (lambda q, k, v: (q.repeat(1, 1, 1, 8), k.repeat(1, 1, 1, 8), v.repeat(1, 1, 1, 8)), "head dims up to 256"),
])
def test_forced_triton_refuses_what_it_does_not_support(change, reason):
    q, k, v = change(*inputs(37, 40, 0)[:3])
    with pytest.raises(BackendUnavailable, match=reason):
        cross_attention(q, k, v, backend="triton")
    cross_attention(q, k, v, backend="auto")  # the reference takes them


def test_compiled_float32_stops_at_the_head_dim_that_fits(monkeypatch):
    """A GPU's shared memory holds float32 tiles up to head dim 128 (tests/kernels/test_triton_compiles.py);
    the interpreter has no such limit, so its tests still run 160."""
    q, k, v = (t.repeat(1, 1, 1, 4) for t in inputs(37, 40, 0)[:3])  # head dim 160
    monkeypatch.setattr(triton_cross_attention, "INTERPRETED", False)
    assert any("float32 up to head dim 128" in r for r in triton_cross_attention.unsupported_reasons(q, k, v))
    assert triton_cross_attention.unsupported_reasons(q.half(), k.half(), v.half()) == []
    assert triton_cross_attention.unsupported_reasons(q[..., :128], k[..., :128], v[..., :128]) == []


def test_fmn_step_matches_torch(tiny_pipeline_dir):
    """One Forget-Me-Not step (watched_sq loss with concept masks, backward to the cross-attention
    keys and values) through backend="triton" gives the loss and gradients of backend="torch"."""
    from fasterase.attention import AttentionCapture, capture_processors
    from fasterase.models.loading import load_pipeline
    from fasterase.models.text import encode_prompts, token_columns

    pipe = load_pipeline(str(tiny_pipeline_dir), device=DEVICE)
    unet = pipe.unet
    prompts = ["a photo of a circle", "a red circle on a striped background"]
    gen = torch.Generator().manual_seed(0)
    latents, masks = randn(2, 4, 8, 8, gen=gen), torch.rand(2, 1, 8, 8, generator=gen).to(DEVICE)
    with torch.no_grad():
        context = encode_prompts(pipe, prompts)
    columns = token_columns(pipe.tokenizer, prompts, ["circle", "circle"], include_end=True).to(DEVICE)
    capture = AttentionCapture(columns, masks)
    weights = {n: p for n, p in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    unet.requires_grad_(False)
    for p in weights.values():
        p.requires_grad_(True)
    results = {}
    for backend in ("torch", "triton"):
        capture.stats.clear()
        with capture_processors(unet, capture, backend):
            unet(latents, torch.tensor([10, 500], device=DEVICE), context)
        loss = capture.watched_sq().mean()
        # The last layer's values reach no statistic: the reference's graph leaves them out.
        results[backend] = (loss, torch.autograd.grad(loss, list(weights.values()), allow_unused=True, materialize_grads=True))
    assert len(capture.stats) == sum(".attn2." in n for n in unet.attn_processors)
    close(results["triton"][0], results["torch"][0], "loss")
    for name, got, expected in zip(weights, results["triton"][1], results["torch"][1]):
        close(got, expected, name, rtol=1e-4)
