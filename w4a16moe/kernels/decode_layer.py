"""The whole decode MoE layer in one launch: GEMM1 programs, then GEMM2 programs that wait.

:func:`w4a16moe.kernels.decode.fused_moe_decode` runs two kernels. At one or two tokens each
is short (qwen3-30b M=1: 3-8 K steps a program) and much of the layer is latency: the gap
between the two graph nodes, and GEMM2's first round trips (expert id, first weights),
which start only when GEMM1 has ended. Here one grid holds both:

* programs ``0 .. T1-1`` are GEMM1 tiles (as :func:`_decode_gemm1_kernel` without split-K).
  Each writes its rows of the intermediate, passes a CTA barrier and bumps the slot's
  ``ready`` counter (release);
* programs ``T1 ..`` are GEMM2 tiles (one slot, a row tile of the output, all of K). Each
  reads its expert id, asks L2 for its weight rows (``prefetch.global.L2``), then waits
  until the slot's ``ready`` counter has all ``cdiv(I, BLOCK_N1)`` GEMM1 tiles (acquire),
  and streams its rows against the slot's intermediate row; the top-k sum runs through the
  decode kernels' arrival protocol.

A GEMM2 program waits only for programs with lower ids, which the GPU starts first (blocks
are dispatched in order of their linear index), and GEMM1 programs never wait, so the wait
always ends. The ``ready`` counters go back to zero in the launch that used them: after the
wait each GEMM2 program adds one more, and the one that brings the count to
``T1_per_slot + T2_per_slot`` resets it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import _activation_and_mul, _stream_rows


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of the 128-byte lines holding ``ptrs`` (any int32 pointers)."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def _nanosleep(v, ns):
    """``nanosleep.u32 ns`` (a hint: the warp sleeps up to ``ns`` ns); returns ``v``."""
    return tl.inline_asm_elementwise(
        "nanosleep.u32 $2;\n\tmov.u32 $0, $1;", "=r,r,r", [v, ns], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def _acquire_fence(v):
    """``fence.acq_rel.gpu`` after a relaxed read that saw a release: later reads see what
    the releasing programs wrote. Returns ``v`` (data dependence keeps it in place)."""
    return tl.inline_asm_elementwise(
        "fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [v], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def _decode_layer_kernel(
    x_ptr, stride_xm,
    qw1_ptr, s1_ptr, z1_ptr, perm1_ptr, num_groups1,
    qw2_ptr, s2_ptr, z2_ptr, perm2_ptr, num_groups2,
    ids_ptr, tw_ptr, emap_ptr,
    inter_ptr, stride_im,
    out_ptr, stride_om,
    acc_ptr, cnt_ptr, ready_ptr,
    H, I, top_k, one_bits, num_gemm1_programs,
    GROUP1: tl.constexpr, GROUP2: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_EMAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_KW1: tl.constexpr, EVEN_N1: tl.constexpr,
    EVEN_K1: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_KW2: tl.constexpr, EVEN_N2: tl.constexpr,
    EVEN_K2: tl.constexpr,
    PREFETCH_L2: tl.constexpr, L2_LINES: tl.constexpr,
    WAIT_MODE: tl.constexpr = 0, SLEEP_NS: tl.constexpr = 64,
):
    """One decode MoE layer: ``out[m] = sum_k w[m,k] W2[e] (act(W1g[e] x[m]) * W1u[e] x[m])``.

    Shapes as :func:`_decode_gemm1_kernel` (w13 ``[E, 2I, H/8]``, x ``[M, H]``) and
    :func:`_decode_gemm2_kernel` (w2 ``[E, H, I/8]``, out ``[M, H]``); inter ``[M*top_k, I]``;
    acc fp32 ``[M, H]``, cnt int32 ``[M * cdiv(H, BLOCK_N2)]``, ready int32 ``[M * top_k]``
    (all zero on entry and on exit).

    Grid ``(T1 + T2,)`` with ``T1 = M*top_k*cdiv(I, BLOCK_N1)`` GEMM1 programs (slot-major)
    and ``T2 = M*top_k*cdiv(H, BLOCK_N2)`` GEMM2 programs (slot-major). ``L2_LINES``: 128-byte
    lines of one w2 row, rounded up to a power of two (the prefetch clamps to the row).
    """
    pid = tl.program_id(0)
    n1_tiles = tl.cdiv(I, BLOCK_N1)
    n2_tiles = tl.cdiv(H, BLOCK_N2)
    KW1 = H // 8
    KW2 = I // 8
    if pid < num_gemm1_programs:
        slot = pid // n1_tiles
        pid_n = pid % n1_tiles
        expert = tl.load(ids_ptr + slot).to(tl.int32)
        if HAS_EMAP:
            expert = tl.load(emap_ptr + expert).to(tl.int32)
        kw_end = tl.where(expert < 0, 0, KW1)
        expert = tl.maximum(expert, 0).to(tl.int64)
        offs_r = tl.arange(0, 2 * BLOCK_N1)
        offs_n = pid_n * BLOCK_N1 + offs_r // 2
        mask_r = offs_n < I
        rows = offs_n + (offs_r % 2) * I
        w_rows = qw1_ptr + expert * (2 * I * KW1) + (rows * KW1)[:, None]
        s_rows = s1_ptr + expert * (2 * I * num_groups1) + (rows * num_groups1)[:, None]
        z_rows = z1_ptr + expert * (2 * I * num_groups1) + (rows * num_groups1)[:, None]
        x_row = x_ptr + (slot // top_k) * stride_xm
        acc = tl.sum(_stream_rows(w_rows, s_rows, z_rows, mask_r, x_row, perm1_ptr + expert * H,
                                  0, kw_end, num_groups1, one_bits, 2 * BLOCK_N1, GROUP1,
                                  BLOCK_KW1, HAS_ZEROS, HAS_PERM, 1, EVEN_N1, EVEN_K1, 1),
                     axis=1)
        pair = tl.reshape(acc, [BLOCK_N1, 2])
        is_up = (tl.arange(0, 2) == 1)[None, :]
        gate = tl.sum(tl.where(is_up, 0.0, pair), axis=1)
        up = tl.sum(tl.where(is_up, pair, 0.0), axis=1)
        if WEIGHT_ON_INPUT:
            rw = tl.load(tw_ptr + slot).to(tl.float32)
            gate *= rw
            up *= rw
        y = _activation_and_mul(gate, up, ACTIVATION)
        offs_o = pid_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        tl.store(inter_ptr + slot * stride_im + offs_o, y.to(inter_ptr.dtype.element_ty),
                 mask=offs_o < I)
        tl.debug_barrier()
        tl.atomic_add(ready_ptr + slot, 1, sem="release")
    else:
        q = pid - num_gemm1_programs
        slot = q // n2_tiles
        pid_n = q % n2_tiles
        token = slot // top_k
        expert = tl.load(ids_ptr + slot).to(tl.int32)
        if HAS_EMAP:
            expert = tl.load(emap_ptr + expert).to(tl.int32)
        kw_end = tl.where(expert < 0, 0, KW2)
        expert = tl.maximum(expert, 0).to(tl.int64)
        offs_h = pid_n * BLOCK_N2 + tl.arange(0, BLOCK_N2)
        mask_n = offs_h < H
        w_base = qw2_ptr + expert * (H * KW2)
        if PREFETCH_L2:
            lines = tl.cdiv(kw_end, 32)
            line = tl.minimum(tl.arange(0, L2_LINES), tl.maximum(lines - 1, 0))
            rows_c = tl.minimum(offs_h, H - 1)
            _prefetch_l2(w_base + (rows_c * KW2)[:, None] + (line * 32)[None, :])
        # wait for the slot's GEMM1 tiles (each added one), then count this program in
        if WAIT_MODE == 0:
            seen = tl.atomic_add(ready_ptr + slot, 0, sem="acquire")
            while seen < n1_tiles:
                seen = tl.atomic_add(ready_ptr + slot, 0, sem="acquire")
        elif WAIT_MODE == 1:
            seen = tl.load(ready_ptr + slot, volatile=True)
            while seen < n1_tiles:
                seen = _nanosleep(seen, seen * 0 + SLEEP_NS)
                seen = tl.load(ready_ptr + slot, volatile=True)
            kw_end = _acquire_fence(kw_end)
        row_w = (offs_h * KW2)[:, None]
        row_s = (offs_h * num_groups2)[:, None]
        part = _stream_rows(w_base + row_w, s2_ptr + expert * (H * num_groups2) + row_s,
                            z2_ptr + expert * (H * num_groups2) + row_s, mask_n,
                            inter_ptr + slot * stride_im, perm2_ptr + expert * I, 0, kw_end,
                            num_groups2, one_bits, BLOCK_N2, GROUP2, BLOCK_KW2, HAS_ZEROS,
                            HAS_PERM, 1, EVEN_N2, EVEN_K2, 1)
        arrived_r = tl.atomic_add(ready_ptr + slot, 1, sem="relaxed")
        if arrived_r == n1_tiles + n2_tiles - 1:
            tl.store(ready_ptr + slot, 0)
        if WEIGHT_ON_INPUT:
            accv = tl.sum(part, axis=1)
        else:
            accv = tl.sum(part, axis=1) * tl.load(tw_ptr + slot).to(tl.float32)
        acc_ptrs = acc_ptr + token * H + offs_h
        out_ptrs = out_ptr + token * stride_om + offs_h
        tl.atomic_add(acc_ptrs, accv, mask=mask_n, sem="relaxed")
        tl.debug_barrier()
        cnt = cnt_ptr + token * n2_tiles + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
        if arrived == top_k - 1:
            yv = tl.load(acc_ptrs, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(acc_ptrs, tl.zeros_like(yv), mask=mask_n)
            tl.store(cnt, 0)
            tl.store(out_ptrs, yv.to(out_ptr.dtype.element_ty), mask=mask_n)


def fused_moe_decode_one_launch(hidden_states, experts, topk_weights, topk_ids, *, out,
                                workspace, block_n1=8, block_kw1=32, block_n2=64,
                                block_kw2=32, num_warps=2, prefetch_l2=True,
                                activation="silu", apply_router_weight_on_input=False,
                                expert_map=None, wait_mode=0, sleep_ns=64):
    """Prototype launcher (benchmarks only for now): the layer of
    :func:`~w4a16moe.kernels.decode.fused_moe_decode` in one launch."""
    from ..layout import PACK_FACTOR
    from .common import ONE_F32_BITS
    from .decode import ACTIVATIONS, _weight_args
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    i = experts.intermediate_size
    slots = m * top_k
    w1, w2 = experts.w13, experts.w2
    a1, a2 = _weight_args(w1), _weight_args(w2)
    t1 = slots * triton.cdiv(i, block_n1)
    t2 = slots * triton.cdiv(h, block_n2)
    kw2 = i // PACK_FACTOR
    inter = workspace.inter[:slots]
    _decode_layer_kernel[(t1 + t2,)](
        hidden_states, hidden_states.stride(0),
        a1["qw_ptr"], a1["s_ptr"], a1["z_ptr"], a1["perm_ptr"], a1["num_groups"],
        a2["qw_ptr"], a2["s_ptr"], a2["z_ptr"], a2["perm_ptr"], a2["num_groups"],
        topk_ids, topk_weights, expert_map if expert_map is not None else topk_ids,
        inter, inter.stride(0), out, out.stride(0),
        workspace.acc2, workspace.cnt2, workspace.cnt1,
        h, i, top_k, int(ONE_F32_BITS), t1,
        GROUP1=w1.group_size, GROUP2=w2.group_size,
        HAS_ZEROS=a1["HAS_ZEROS"], HAS_PERM=a1["HAS_PERM"], HAS_EMAP=expert_map is not None,
        WEIGHT_ON_INPUT=apply_router_weight_on_input, ACTIVATION=ACTIVATIONS[activation],
        BLOCK_N1=block_n1, BLOCK_KW1=block_kw1, EVEN_N1=i % block_n1 == 0,
        EVEN_K1=(h // PACK_FACTOR) % block_kw1 == 0,
        BLOCK_N2=block_n2, BLOCK_KW2=block_kw2, EVEN_N2=h % block_n2 == 0,
        EVEN_K2=kw2 % block_kw2 == 0,
        PREFETCH_L2=prefetch_l2, L2_LINES=triton.next_power_of_2(triton.cdiv(kw2, 32)),
        WAIT_MODE=wait_mode, SLEEP_NS=sleep_ns,
        num_warps=num_warps, num_stages=1,
    )
    return out
