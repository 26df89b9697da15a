"""Prompt-concatenated cross-attention with attention capture, in Triton (forward and backward).

softmax(q [k; prompt_k]^T * scale) [v; prompt_v] without materialising the concatenation or the
attention matrix: one program per (query tile, batch item, head) holds all text keys in one tile
(Mk <= 128), so the text softmax and the captured statistics finish in one pass, then walks the
prompt keys (shared by the batch) with an online softmax. The forward saves q, k, v, the prompt,
the output and the row log-sum-exp; the backward recomputes P from the log-sum-exp, again one
program per query tile (with 77 keys a split over key blocks has no parallelism), and reduces
the key gradients over query tiles and batch items with fp32 atomics. Derivations and the
reduction choices: kernels/README.md.

Layout: kernels, launchers, the custom ops (`fasterase::cross_attention_triton` and its backward,
with fake implementations and autograd), then `cross_attention_triton`, the dispatcher's entry
point. The file is not named after the op: importing a submodule `kernels.cross_attention` would
replace the package's function `cross_attention` by the module.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .capture import AttentionStats, Capture

_TEXT_TILE = 128  # the most text keys one tile holds
_MAX_HEAD_DIM = 256
# Compiled float32 tiles are twice the bytes: at head dim 160 the backward needs 272 KiB of shared
# memory, over sm_90's 227 KiB (tests/kernels/triton_aot.py; 128 needs 224 KiB).
_MAX_FP32_HEAD_DIM = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# TRITON_INTERPRET=1 when triton decorates the kernels below runs them on CPU tensors (tests).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Queries per program. Under the interpreter the tiles are small, so that CPU tests with short
# query lengths still cover several query tiles and a ragged last one.
BLOCK_M = 32 if INTERPRETED else 64
BLOCK_P = 64  # prompt keys per step of the online softmax
# Tests set POISON: fresh outputs then start as NaN, so a region a kernel leaves unwritten fails.
POISON = False


@triton.jit
def _load_rows(ptr, rows, row_mask, stride_row, col0, WIDTH: tl.constexpr, D: tl.constexpr):
    """(len(rows), WIDTH) tile of columns col0 .. col0 + WIDTH of a (.., D) row-major matrix; 0 outside."""
    cols = col0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, rows, row_mask, stride_row, col0, WIDTH: tl.constexpr, D: tl.constexpr, value):
    cols = col0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rows(ptr, rows, row_mask, col0, WIDTH: tl.constexpr, D: tl.constexpr, value):
    """Atomically adds a (len(rows), WIDTH) tile into a contiguous fp32 (.., D) matrix."""
    cols = col0 + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols[None, :] < D)
    tl.atomic_add(ptr + rows[:, None] * D + cols[None, :], value, mask=mask, sem="relaxed")  # a sum: no ordering needed


@triton.jit
def _row_weights(ROWS, b, Mq, offs_m, m_mask, HAS_ROWS: tl.constexpr):
    """(BLOCK_M,) fp32: how much each query row counts in the statistics (the capture's row
    weights, or 1 on every real row), 0 past Mq."""
    if HAS_ROWS:
        weights = tl.load(ROWS + b * Mq + offs_m, mask=m_mask, other=0.0)
    else:
        weights = m_mask.to(tl.float32)
    return weights


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: bf16 operands go in as fp32 (exact), because the
    interpreter multiplies bf16 tiles as their raw 16-bit integers."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cross_attention_fwd_kernel(
    Q, K, V, PK, PV, O, LSE, ROWS, PARTIAL, MAP_INDEX, MAPS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vm,
    stride_pkh, stride_pkm, stride_pvh, stride_pvm,
    stride_ob, stride_oh, stride_om,
    H, Mq, Mk, Mp, W, scale,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    CAPTURE: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_MAPS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Q, O: (B, H, Mq, D); K, V: (B, H, Mk, D); PK, PV: (H, Mp, D); LSE: (B, H, Mq) fp32;
    # ROWS: (B, Mq) fp32; PARTIAL: (2, B, H, tiles, Mk) fp32, per-tile column mass and squares;
    # MAP_INDEX: (B, W) int64; MAPS: (B, H, Mq, W) fp32. Head dim D is split in two power-of-two
    # tiles DA + DB (DB may be 0): 40 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Mq
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < Mk
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp2 instead of exp

    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    q_a = _load_rows(q_ptr, offs_m, m_mask, stride_qm, 0, DA, D)  # (BLOCK_M, DA)
    s = _dot(q_a, tl.trans(_load_rows(k_ptr, offs_t, t_mask, stride_km, 0, DA, D)), PRECISION, UPCAST)
    if DB > 0:
        q_b = _load_rows(q_ptr, offs_m, m_mask, stride_qm, DA, DB, D)  # (BLOCK_M, DB)
        s += _dot(q_b, tl.trans(_load_rows(k_ptr, offs_t, t_mask, stride_km, DA, DB, D)), PRECISION, UPCAST)
    s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_T)
    m_i = tl.max(s, 1)
    m_text = m_i
    p_text = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p_text, 1)
    v_a = _load_rows(v_ptr, offs_t, t_mask, stride_vm, 0, DA, D)
    acc_a = _dot(p_text.to(v_a.dtype), v_a, PRECISION, UPCAST)  # (BLOCK_M, DA) fp32
    if DB > 0:
        v_b = _load_rows(v_ptr, offs_t, t_mask, stride_vm, DA, DB, D)
        acc_b = _dot(p_text.to(v_b.dtype), v_b, PRECISION, UPCAST)

    pk_ptr = PK + h * stride_pkh
    pv_ptr = PV + h * stride_pvh
    for start in range(0, Mp, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_mask = offs_p < Mp
        pk_a = _load_rows(pk_ptr, offs_p, p_mask, stride_pkm, 0, DA, D).to(q_a.dtype)
        s_p = _dot(q_a, tl.trans(pk_a), PRECISION, UPCAST)
        if DB > 0:
            pk_b = _load_rows(pk_ptr, offs_p, p_mask, stride_pkm, DA, DB, D).to(q_b.dtype)
            s_p += _dot(q_b, tl.trans(pk_b), PRECISION, UPCAST)
        s_p = tl.where(p_mask[None, :], s_p * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_P)
        m_new = tl.maximum(m_i, tl.max(s_p, 1))
        alpha = tl.exp2(m_i - m_new)
        p_p = tl.exp2(s_p - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p_p, 1)
        pv_a = _load_rows(pv_ptr, offs_p, p_mask, stride_pvm, 0, DA, D).to(v_a.dtype)
        acc_a = acc_a * alpha[:, None] + _dot(p_p.to(pv_a.dtype), pv_a, PRECISION, UPCAST)
        if DB > 0:
            pv_b = _load_rows(pv_ptr, offs_p, p_mask, stride_pvm, DA, DB, D).to(v_a.dtype)
            acc_b = acc_b * alpha[:, None] + _dot(p_p.to(pv_b.dtype), pv_b, PRECISION, UPCAST)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_ptr = O + b * stride_ob + h * stride_oh
    _store_rows(o_ptr, offs_m, m_mask, stride_om, 0, DA, D, acc_a * inv_l[:, None])
    if DB > 0:
        _store_rows(o_ptr, offs_m, m_mask, stride_om, DA, DB, D, acc_b * inv_l[:, None])
    tl.store(LSE + pid_bh * Mq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)

    if CAPTURE:
        # P over all keys (text and prompt), on the text columns: (BLOCK_M, BLOCK_T).
        probs = p_text * (tl.exp2(m_text - m_i) * inv_l)[:, None]
        weighted = probs * _row_weights(ROWS, b, Mq, offs_m, m_mask, HAS_ROWS)[:, None]
        tiles = tl.num_programs(0)
        partial = PARTIAL + (pid_bh * tiles + pid_m) * Mk + offs_t
        tl.store(partial, tl.sum(weighted, 0), mask=t_mask)
        tl.store(partial + tl.num_programs(1) * tiles * Mk, tl.sum(weighted * probs, 0), mask=t_mask)
        if HAS_MAPS:
            for slot in range(W):
                column = tl.load(MAP_INDEX + b * W + slot)  # -1 (unused) matches no column: zeros
                picked = tl.sum(tl.where(offs_t[None, :] == column, probs, 0.0), 1)
                tl.store(MAPS + (pid_bh * Mq + offs_m) * W + slot, picked, mask=m_mask)


@triton.jit
def _cross_attention_bwd_kernel(
    Q, K, V, PK, PV, O, DO, LSE, ROWS, G_MASS, G_SQ, MAP_INDEX, G_MAPS,
    DQ, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_vb, stride_vh, stride_vm,
    stride_pkh, stride_pkm, stride_pvh, stride_pvm,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, Mq, Mk, Mp, W, scale,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_G_STATS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_G_MAPS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Q, O, DO, DQ: (B, H, Mq, D); K, V: (B, H, Mk, D); PK, PV: (H, Mp, D); LSE: (B, H, Mq);
    # G_MASS, G_SQ: (B, H, Mk) fp32; G_MAPS: (B, H, Mq, W) fp32; DK, DV: (B, H, Mk, D) and
    # DPK, DPV: (H, Mp, D), contiguous fp32, zeroed, summed into with atomics.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Mq
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < Mk
    qk_scale = scale * 1.4426950408889634

    q_ptr = Q + b * stride_qb + h * stride_qh
    o_ptr = O + b * stride_ob + h * stride_oh
    do_ptr = DO + b * stride_dob + h * stride_doh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    q_a = _load_rows(q_ptr, offs_m, m_mask, stride_qm, 0, DA, D)
    do_a = _load_rows(do_ptr, offs_m, m_mask, stride_dom, 0, DA, D)
    delta = tl.sum(do_a.to(tl.float32) * _load_rows(o_ptr, offs_m, m_mask, stride_om, 0, DA, D).to(tl.float32), 1)
    if DB > 0:
        q_b = _load_rows(q_ptr, offs_m, m_mask, stride_qm, DA, DB, D)
        do_b = _load_rows(do_ptr, offs_m, m_mask, stride_dom, DA, DB, D)
        delta += tl.sum(do_b.to(tl.float32) * _load_rows(o_ptr, offs_m, m_mask, stride_om, DA, DB, D).to(tl.float32), 1)
    # Rows past Mq get lse = inf, so their P is 0 and they add nothing to the key gradients.
    lse2 = tl.load(LSE + pid_bh * Mq + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634

    k_a = _load_rows(k_ptr, offs_t, t_mask, stride_km, 0, DA, D)
    v_a = _load_rows(v_ptr, offs_t, t_mask, stride_vm, 0, DA, D)
    s = _dot(q_a, tl.trans(k_a), PRECISION, UPCAST)
    dp = _dot(do_a, tl.trans(v_a), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_T)
    if DB > 0:
        k_b = _load_rows(k_ptr, offs_t, t_mask, stride_km, DA, DB, D)
        v_b = _load_rows(v_ptr, offs_t, t_mask, stride_vm, DA, DB, D)
        s += _dot(q_b, tl.trans(k_b), PRECISION, UPCAST)
        dp += _dot(do_b, tl.trans(v_b), PRECISION, UPCAST)
    s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
    p = tl.exp2(s - lse2[:, None])  # (BLOCK_M, BLOCK_T), P on the text columns
    if HAS_G_STATS or HAS_G_MAPS:
        # The statistics' share of dL/dP (text columns only) and of delta = sum_j P_ij dP_ij.
        extra = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
        if HAS_G_STATS:
            weights = _row_weights(ROWS, b, Mq, offs_m, m_mask, HAS_ROWS)
            g_mass = tl.load(G_MASS + pid_bh * Mk + offs_t, mask=t_mask, other=0.0)
            g_sq = tl.load(G_SQ + pid_bh * Mk + offs_t, mask=t_mask, other=0.0)
            extra += weights[:, None] * (g_mass[None, :] + 2.0 * p * g_sq[None, :])
        if HAS_G_MAPS:
            for slot in range(W):
                column = tl.load(MAP_INDEX + b * W + slot)
                g_map = tl.load(G_MAPS + (pid_bh * Mq + offs_m) * W + slot, mask=m_mask, other=0.0)
                extra += tl.where(offs_t[None, :] == column, g_map[:, None], 0.0)
        dp += extra
        delta += tl.sum(p * extra, 1)
    ds = p * (dp - delta[:, None])

    dq_a = _dot(ds.to(k_a.dtype), k_a, PRECISION, UPCAST)  # (BLOCK_M, DA), scaled at the end
    dk_ptr = DK + pid_bh * Mk * D
    dv_ptr = DV + pid_bh * Mk * D
    ds_t = tl.trans(ds).to(q_a.dtype)  # (BLOCK_T, BLOCK_M)
    p_t = tl.trans(p).to(do_a.dtype)
    _add_rows(dk_ptr, offs_t, t_mask, 0, DA, D, _dot(ds_t, q_a, PRECISION, UPCAST) * scale)
    _add_rows(dv_ptr, offs_t, t_mask, 0, DA, D, _dot(p_t, do_a, PRECISION, UPCAST))
    if DB > 0:
        dq_b = _dot(ds.to(k_b.dtype), k_b, PRECISION, UPCAST)
        _add_rows(dk_ptr, offs_t, t_mask, DA, DB, D, _dot(ds_t, q_b, PRECISION, UPCAST) * scale)
        _add_rows(dv_ptr, offs_t, t_mask, DA, DB, D, _dot(p_t, do_b, PRECISION, UPCAST))

    pk_ptr = PK + h * stride_pkh
    pv_ptr = PV + h * stride_pvh
    dpk_ptr = DPK + h * Mp * D
    dpv_ptr = DPV + h * Mp * D
    for start in range(0, Mp, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_mask = offs_p < Mp
        pk_a = _load_rows(pk_ptr, offs_p, p_mask, stride_pkm, 0, DA, D).to(q_a.dtype)
        pv_a = _load_rows(pv_ptr, offs_p, p_mask, stride_pvm, 0, DA, D).to(do_a.dtype)
        s_p = _dot(q_a, tl.trans(pk_a), PRECISION, UPCAST)
        dp_p = _dot(do_a, tl.trans(pv_a), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_P)
        if DB > 0:
            pk_b = _load_rows(pk_ptr, offs_p, p_mask, stride_pkm, DA, DB, D).to(q_a.dtype)
            pv_b = _load_rows(pv_ptr, offs_p, p_mask, stride_pvm, DA, DB, D).to(do_a.dtype)
            s_p += _dot(q_b, tl.trans(pk_b), PRECISION, UPCAST)
            dp_p += _dot(do_b, tl.trans(pv_b), PRECISION, UPCAST)
        s_p = tl.where(p_mask[None, :], s_p * qk_scale, float("-inf"))
        p_p = tl.exp2(s_p - lse2[:, None])
        ds_p = p_p * (dp_p - delta[:, None])
        ds_p_t = tl.trans(ds_p).to(q_a.dtype)  # (BLOCK_P, BLOCK_M)
        p_p_t = tl.trans(p_p).to(do_a.dtype)
        dq_a += _dot(ds_p.to(pk_a.dtype), pk_a, PRECISION, UPCAST)
        _add_rows(dpk_ptr, offs_p, p_mask, 0, DA, D, _dot(ds_p_t, q_a, PRECISION, UPCAST) * scale)
        _add_rows(dpv_ptr, offs_p, p_mask, 0, DA, D, _dot(p_p_t, do_a, PRECISION, UPCAST))
        if DB > 0:
            dq_b += _dot(ds_p.to(pk_b.dtype), pk_b, PRECISION, UPCAST)
            _add_rows(dpk_ptr, offs_p, p_mask, DA, DB, D, _dot(ds_p_t, q_b, PRECISION, UPCAST) * scale)
            _add_rows(dpv_ptr, offs_p, p_mask, DA, DB, D, _dot(p_p_t, do_b, PRECISION, UPCAST))

    dq_ptr = DQ + b * stride_dqb + h * stride_dqh
    _store_rows(dq_ptr, offs_m, m_mask, stride_dqm, 0, DA, D, dq_a * scale)
    if DB > 0:
        _store_rows(dq_ptr, offs_m, m_mask, stride_dqm, DA, DB, D, dq_b * scale)


def _head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """Two power-of-two tiles covering the head dim (the second may be 0), at least 16 wide each
    as tl.dot needs: 40 -> (32, 16), 64 -> (64, 0), 80 -> (64, 16), 160 -> (128, 32)."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    return first, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def _text_tile(text: int) -> int:
    return max(16, triton.next_power_of_2(text))


def _kernel_options(q: torch.Tensor, backward: bool) -> dict:
    return {
        # fp32 inputs multiply as torch's own fp32 products do: in fp32 under its default
        # float32_matmul_precision "highest" (results match the reference closely), in TF32 once
        # "high" or "medium" allows it. (ieee dots compile to far slower code: sm_90 reports ~10 KB
        # of spills a thread in every fp32 variant, against ~0.5 KB with tf32.)
        "PRECISION": "ieee" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32",
        "UPCAST": INTERPRETED and q.dtype == torch.bfloat16,
        # Register spills in ptxas's sm_90 report (fp16, 64 queries, capture): 4 warps spill in
        # every backward (56 to 970 bytes a thread) and in the forward at head dim 160 (1.5 KB);
        # 8 warps cut that to 80 to 940 and 96 bytes. Not yet timed on a GPU.
        "num_warps": 8 if backward or q.shape[-1] > 80 else 4,
    }


def _fresh(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON else torch.empty(shape, dtype=dtype, device=device)


def _last_dim_unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fresh_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if POISON else torch.empty_like(t)


def _prompt_strides(prompt_k, prompt_v, has_prompt: bool) -> tuple[int, int, int, int]:
    if not has_prompt:
        return 0, 0, 0, 0
    return prompt_k.stride(0), prompt_k.stride(1), prompt_v.stride(0), prompt_v.stride(1)


def _map_width(capture: bool, map_index: torch.Tensor | None) -> int:
    """W, the maps' last dim: the watched slots, when capturing them."""
    return map_index.shape[1] if capture and map_index is not None else 0


def _output_like(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Mq, D) stored as (B, Mq, H, D): the layout diffusers' processors reshape to free."""
    batch, heads, queries, dim = q.shape
    return _fresh((batch, queries, heads, dim), q.dtype, q.device).transpose(1, 2)


def _forward(q, k, v, prompt_k, prompt_v, scale, capture, rows, map_index):
    batch, heads, queries, dim = q.shape
    text = k.shape[2]
    q, k, v = (_last_dim_unit_stride(t) for t in (q, k, v))
    has_prompt = prompt_k is not None
    prompt_k = _last_dim_unit_stride(prompt_k) if has_prompt else k  # unread when there is no prompt
    prompt_v = _last_dim_unit_stride(prompt_v) if has_prompt else v
    prompt = prompt_k.shape[1] if has_prompt else 0
    width = _map_width(capture, map_index)
    tiles = triton.cdiv(queries, BLOCK_M)
    f32 = torch.float32

    out = _output_like(q)
    lse = _fresh((batch, heads, queries), f32, q.device)
    partial = _fresh((2, batch, heads, tiles, text) if capture else (0,), f32, q.device)
    maps = _fresh((batch, heads, queries, width), f32, q.device)
    rows_given = rows is not None
    rows = rows.float().contiguous() if rows_given else lse  # unread without row weights
    index = map_index.contiguous() if map_index is not None else lse
    dim_a, dim_b = _head_dim_tiles(dim)
    _cross_attention_fwd_kernel[(tiles, batch * heads)](
        q, k, v, prompt_k, prompt_v, out, lse, rows, partial, index, maps,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_prompt_strides(prompt_k, prompt_v, has_prompt),
        out.stride(0), out.stride(1), out.stride(2),
        heads, queries, text, prompt, width, scale,
        D=dim, DA=dim_a, DB=dim_b, BLOCK_M=BLOCK_M, BLOCK_T=_text_tile(text), BLOCK_P=BLOCK_P,
        CAPTURE=capture, HAS_ROWS=rows_given, HAS_MAPS=width > 0,
        **_kernel_options(q, backward=False),
    )
    if capture:
        column_mass, column_sq = partial[0].sum(2), partial[1].sum(2)
    else:
        column_mass, column_sq = (q.new_empty((batch, heads, 0), dtype=f32) for _ in range(2))
    return out, lse, column_mass, column_sq, maps


def _backward(grad_out, grad_mass, grad_sq, grad_maps, q, k, v, prompt_k, prompt_v, out, lse, scale, rows, map_index):
    batch, heads, queries, dim = q.shape
    text = k.shape[2]
    q, k, v, out, grad_out = (_last_dim_unit_stride(t) for t in (q, k, v, out, grad_out))
    has_prompt = prompt_k is not None
    f32 = torch.float32
    dq = _fresh_like(q)
    dk = torch.zeros((batch, heads, text, dim), dtype=f32, device=q.device)
    dv = torch.zeros((batch, heads, text, dim), dtype=f32, device=q.device)
    if has_prompt:
        prompt_k, prompt_v = _last_dim_unit_stride(prompt_k), _last_dim_unit_stride(prompt_v)
        prompt = prompt_k.shape[1]
        dpk = torch.zeros((heads, prompt, dim), dtype=f32, device=q.device)
        dpv = torch.zeros((heads, prompt, dim), dtype=f32, device=q.device)
    else:
        prompt_k, prompt_v, prompt, dpk, dpv = k, v, 0, dk, dv  # unread, unwritten
    has_stats = grad_mass is not None
    grad_mass = grad_mass.float().contiguous() if has_stats else lse
    grad_sq = grad_sq.float().contiguous() if has_stats else lse
    has_maps = grad_maps is not None
    grad_maps = grad_maps.float().contiguous() if has_maps else lse
    width = map_index.shape[1] if has_maps else 0
    index = map_index.contiguous() if has_maps else lse
    rows_given = rows is not None
    rows = rows.float().contiguous() if rows_given else lse
    dim_a, dim_b = _head_dim_tiles(dim)
    _cross_attention_bwd_kernel[(triton.cdiv(queries, BLOCK_M), batch * heads)](
        q, k, v, prompt_k, prompt_v, out, grad_out, lse, rows, grad_mass, grad_sq, index, grad_maps,
        dq, dk, dv, dpk, dpv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_prompt_strides(prompt_k, prompt_v, has_prompt),
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        heads, queries, text, prompt, width, scale,
        D=dim, DA=dim_a, DB=dim_b, BLOCK_M=BLOCK_M, BLOCK_T=_text_tile(text), BLOCK_P=BLOCK_P,
        HAS_G_STATS=has_stats, HAS_ROWS=rows_given, HAS_G_MAPS=has_maps,
        **_kernel_options(q, backward=True),
    )
    if not has_prompt:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = dpk.to(prompt_k.dtype), dpv.to(prompt_v.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dpk, dpv


FORWARD_OP = "fasterase::cross_attention_triton"
BACKWARD_OP = "fasterase::cross_attention_triton_backward"


def _forward_fake(q, k, v, prompt_k, prompt_v, scale, capture, rows, map_index):
    batch, heads, queries, _ = q.shape
    f32 = torch.float32
    stats = (batch, heads, k.shape[2] if capture else 0)
    width = _map_width(capture, map_index)
    return (
        q.new_empty((batch, queries, heads, q.shape[3])).transpose(1, 2),
        q.new_empty((batch, heads, queries), dtype=f32),
        q.new_empty(stats, dtype=f32),
        q.new_empty(stats, dtype=f32),
        q.new_empty((batch, heads, queries, width), dtype=f32),
    )


def _backward_fake(grad_out, grad_mass, grad_sq, grad_maps, q, k, v, prompt_k, prompt_v, out, lse, scale, rows, map_index):
    if prompt_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (prompt_k, prompt_v))
    return (
        torch.empty_like(_last_dim_unit_stride(q)),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        dpk,
        dpv,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, scale, capture, rows, map_index = inputs
    out, lse, _, _, _ = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, rows, map_index)
    ctx.scale, ctx.capture = scale, capture
    ctx.mark_non_differentiable(lse)
    # Outputs nobody differentiates (the maps, often one statistic) arrive as None, not as zeros.
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, grad_out, grad_lse, grad_mass, grad_sq, grad_maps):
    q, k, v, prompt_k, prompt_v, out, lse, rows, map_index = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if ctx.capture and (grad_mass is not None or grad_sq is not None):
        grad_mass = torch.zeros_like(grad_sq) if grad_mass is None else grad_mass
        grad_sq = torch.zeros_like(grad_mass) if grad_sq is None else grad_sq
    else:
        grad_mass = grad_sq = None
    if not ctx.capture or map_index is None:
        grad_maps = None
    dq, dk, dv, dpk, dpv = torch.ops.fasterase.cross_attention_triton_backward(
        grad_out, grad_mass, grad_sq, grad_maps, q, k, v, prompt_k, prompt_v, out, lse, ctx.scale, rows, map_index
    )
    if prompt_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None


# Custom ops, which torch.compile keeps whole (their fake implementations give it the shapes) and
# CUDA graphs capture: the forward returns (out (B, H, Mq, D), lse (B, H, Mq), column_mass
# (B, H, Mk), column_sq (B, H, Mk), maps (B, H, Mq, W)), the statistics (B, H, 0) without capture
# and maps (B, H, Mq, 0) without capture or map_index; the backward returns (dq, dk, dv, dprompt_k, dprompt_v), the prompt's empty without
# a prompt. Registered once per process: run from the repository's root, this folder is also
# importable as the top-level package `kernels`, and then this module may run twice.
if not hasattr(torch.ops.fasterase, "cross_attention_triton"):
    torch.library.define(
        FORWARD_OP,
        "(Tensor q, Tensor k, Tensor v, Tensor? prompt_k, Tensor? prompt_v, float scale, bool capture, "
        "Tensor? rows, Tensor? map_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
    torch.library.register_kernel(FORWARD_OP, ("cpu", "cuda"), _forward)
    torch.library.register_fake(FORWARD_OP, _forward_fake)
    torch.library.register_autograd(FORWARD_OP, _backward_rule, setup_context=_setup_context)
    torch.library.define(
        BACKWARD_OP,
        "(Tensor grad_out, Tensor? grad_mass, Tensor? grad_sq, Tensor? grad_maps, Tensor q, Tensor k, Tensor v, "
        "Tensor? prompt_k, Tensor? prompt_v, Tensor out, Tensor lse, float scale, Tensor? rows, Tensor? map_index) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
    torch.library.register_kernel(BACKWARD_OP, ("cpu", "cuda"), _backward)
    torch.library.register_fake(BACKWARD_OP, _backward_fake)


def unsupported_reasons(q, k, v, prompt_k=None, prompt_v=None, scale=None, capture=None) -> list[str]:
    """Why the Triton kernels cannot take these arguments of cross_attention (empty when they can);
    the device is the dispatcher's concern."""
    reasons = []
    if q.dtype not in _DTYPES:
        reasons.append(f"triton cross_attention takes float32, float16 or bfloat16, not {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"triton cross_attention needs q, k, v in one dtype, not {q.dtype}, {k.dtype}, {v.dtype}")
    if prompt_k is not None and (prompt_k.dtype not in _DTYPES or prompt_v.dtype not in _DTYPES):
        reasons.append(f"triton cross_attention takes a float32, float16 or bfloat16 prompt, not {prompt_k.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"triton cross_attention takes head dims up to {_MAX_HEAD_DIM}, not {q.shape[-1]}")
    elif q.dtype == torch.float32 and q.shape[-1] > _MAX_FP32_HEAD_DIM and not INTERPRETED:
        reasons.append(
            f"triton cross_attention takes float32 up to head dim {_MAX_FP32_HEAD_DIM}, not {q.shape[-1]}"
            " (larger tiles overflow the GPU's shared memory); float16 and bfloat16 go to 256"
        )
    if not 0 < k.shape[2] <= _TEXT_TILE:
        reasons.append(f"triton cross_attention holds 1 to {_TEXT_TILE} text keys in one tile, not {k.shape[2]}")
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        reasons.append(f"triton cross_attention launches no program for empty queries {tuple(q.shape)}")
    if q.shape[0] * q.shape[1] > 65535:
        reasons.append(f"triton cross_attention launches one program row per (batch, head): at most 65535, not {q.shape[0] * q.shape[1]}")
    return reasons


def cross_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    capture: Capture | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """softmax(q [k; prompt_k]^T * scale) [v; prompt_v] in Triton; with `capture`, also the
    statistics of its watched text columns (`AttentionStats`), as `cross_attention_reference`.

    q: (B, H, Mq, D); k, v: (B, H, Mk, D), Mk <= 128; prompt_k, prompt_v: (H, Mp, D), any Mp,
    shared by the batch (cast to q's dtype); D <= 256. q, k, v in one of float32, float16,
    bfloat16; fp32 accumulation; the output in q's dtype, the statistics in float32.
    Gradients flow to q, k, v, prompt_k and prompt_v from the output and from every statistic,
    maps included; the capture's row weights are constants (no gradient).
    """
    reasons = unsupported_reasons(q, k, v, prompt_k, prompt_v, scale, capture)
    if reasons:
        raise ValueError("; ".join(reasons))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rows = capture.rows if capture is not None else None
    map_index = capture.columns if capture is not None and capture.maps else None
    out, _, column_mass, column_sq, maps = torch.ops.fasterase.cross_attention_triton(
        q, k, v, prompt_k, prompt_v, scale, capture is not None, rows, map_index
    )
    if capture is None:
        return out
    watched_sq = (column_sq * capture.column_weights(k.shape[2])[:, None, :]).sum(-1)
    return out, AttentionStats(watched_sq, column_mass, column_sq, maps if capture.maps else None)
