"""cross_attention with capture on every SD1.x cross-attention layer shape: fp16 on a GPU (an
H200-sized run), float32 and batch 1 on a CPU.

Providers, all in the same run:
- triton: ours, output + capture statistics (all 77 text columns), no attention matrix stored;
- torch: the reference, which materialises the attention matrix;
- sdpa: torch's scaled_dot_product_attention on the concatenated keys, without capture (the floor
  a capture costs against);
- onehot: SDPA with W one-hot columns appended to V, so the probabilities of the W watched tokens
  come out as W extra output columns (the usual trick to get them without the matrix).
Modes: fwd (inputs without grad) and fwd+bwd (loss = <out, g> + watched_sq, gradients to q, k, v,
and the prompt). Timing: plain (one step, then synchronise) and, on CUDA, graph (GRAPH_STEPS steps
captured in one CUDA graph, replayed, then synchronise). On a CPU triton does not run (its
kernels are compiled for CUDA; the interpreter is for tests, not timing). extra_info: per-step time, peak memory of one eager
step, and the speed-up against every provider measured before this one for the same case (the
providers run in the order torch, sdpa, onehot, triton).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fasterase.kernels import Capture, cross_attention, cross_attention_reference
from measure import CUDA, DEVICE, peak_bytes, synchronize

pytestmark = pytest.mark.usefixtures("record_result")

HEADS, TEXT, WATCHED = 8, 77, 8
LAYERS = {"4096x40": (4096, 40), "1024x80": (1024, 80), "256x160": (256, 160), "64x160": (64, 160)}
PROMPTS = {"text": 0, "text+prompt": 770}
PROVIDERS = ("torch", "sdpa", "onehot", "triton")
BATCHES = [1, 2, 8] if CUDA else [1]
TIMINGS = ["plain", "graph"] if CUDA else ["plain"]
DTYPE = torch.float16 if CUDA else torch.float32
# warm-up calls compile the Triton kernels before any capture or timing; nothing compiles on a CPU
ROUNDS, WARMUP, GRAPH_STEPS = (20, 3, 10) if CUDA else (5, 1, 1)

# (case, provider) -> seconds per step, so later providers report their speed-up over earlier ones.
_STEP_SECONDS: dict[tuple, float] = {}


def make_inputs(batch: int, queries: int, dim: int, prompt: int, grad: bool):
    """Tensors in the layout diffusers' processors give the op: head-split views of (B, M, H*D)."""
    def heads(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE).transpose(-3, -2).requires_grad_(grad)

    q, k, v = heads(batch, queries, HEADS, dim), heads(batch, TEXT, HEADS, dim), heads(batch, TEXT, HEADS, dim)
    pk, pv = (heads(prompt, HEADS, dim), heads(prompt, HEADS, dim)) if prompt else (None, None)
    columns = torch.zeros(batch, TEXT, dtype=torch.bool, device=DEVICE)
    columns[:, 2 : 2 + WATCHED] = True
    return q, k, v, pk, pv, columns


def attention_step(provider: str, mode: str, q, k, v, pk, pv, columns):
    """One call of `provider` (and its backward in fwd+bwd), as a function of nothing."""
    batch, dim = q.shape[0], q.shape[-1]
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grad_out = torch.randn_like(q)

    def concatenated(text, prompt):
        return text if prompt is None else torch.cat([text, prompt.expand(batch, -1, -1, -1)], dim=2)

    # onehot: value columns e_c for each watched text column c, zero on the prompt keys. Built
    # once: it depends on the watched columns only (and nonzero() would stop a graph capture).
    keys_total = k.shape[2] + (0 if pk is None else pk.shape[1])
    index = columns.nonzero()[:, 1].view(batch, 1, 1, WATCHED).expand(-1, HEADS, -1, -1)
    onehot = torch.zeros(batch, HEADS, keys_total, WATCHED, device=q.device, dtype=q.dtype).scatter_(2, index, 1.0)

    def forward():
        """(out, watched_sq or None)"""
        if provider == "triton":
            out, stats = cross_attention(q, k, v, prompt_k=pk, prompt_v=pv, capture=Capture(columns), backend="triton")
            return out, stats.watched_sq
        if provider == "torch":
            out, stats = cross_attention_reference(q, k, v, pk, pv, None, Capture(columns))
            return out, stats.watched_sq
        keys, values = concatenated(k, pk), concatenated(v, pv)
        if provider == "sdpa":
            return F.scaled_dot_product_attention(q, keys, values), None
        out = F.scaled_dot_product_attention(q, keys, torch.cat([values, onehot], dim=-1))
        return out[..., :dim], out[..., dim:].float().square().sum((2, 3))

    if mode == "fwd":
        return forward

    def forward_backward():
        out, watched_sq = forward()
        loss = (out.float() * grad_out).sum() + (0 if watched_sq is None else watched_sq.sum())
        return torch.autograd.grad(loss, leaves)

    return forward_backward


def graph_of(step, repeats: int) -> torch.cuda.CUDAGraph:
    """`repeats` calls of `step` captured in one CUDA graph (after warming up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            step()
    return graph


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("timing", TIMINGS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_cross_attention(benchmark, layer, batch, prompt, mode, timing, provider):
    if provider == "triton" and not CUDA:
        pytest.skip("the Triton kernels are timed on CUDA only (on a CPU only the interpreter runs them, for tests)")
    queries, dim = LAYERS[layer]
    tensors = make_inputs(batch, queries, dim, PROMPTS[prompt], grad=mode == "fwd+bwd")
    step = attention_step(provider, mode, *tensors)
    context = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with context:
        for _ in range(WARMUP):
            step()
        memory = peak_bytes(step)
        if timing == "graph":
            graph = graph_of(step, GRAPH_STEPS)
            steps = GRAPH_STEPS

            def timed():
                graph.replay()
                torch.cuda.synchronize()
        else:
            steps = 1

            def timed():
                step()
                synchronize()

        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
        return
    seconds = benchmark.stats.stats.median / steps
    case = (layer, batch, prompt, mode, timing)
    _STEP_SECONDS[case, provider] = seconds
    benchmark.extra_info.update({
        "batch": batch, "heads": HEADS, "queries": queries, "head_dim": dim, "text_keys": TEXT,
        "prompt_keys": PROMPTS[prompt], "watched": WATCHED, "dtype": str(DTYPE).removeprefix("torch."),
        "steps_per_call": steps, "step_us": seconds * 1e6, "peak_mb": None if memory is None else memory / 2**20,
        **{f"speedup_vs_{other}": _STEP_SECONDS[case, other] / seconds
           for other in PROVIDERS[: PROVIDERS.index(provider)] if (case, other) in _STEP_SECONDS},
    })
