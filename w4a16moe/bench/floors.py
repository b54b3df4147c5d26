"""Bytes, flops and the time floor of one MoE layer (DESIGN.md section 7).

The two GEMMs of a routed-experts layer with M tokens, each sent to ``top_k`` of E experts:

* GEMM1 (w13, ``[E, 2I, H]``): reads ``u`` experts' packed weights and scales, the
  activations ``[M, H]``, and writes the activated intermediate ``[M*top_k, I]`` (the
  ``act(gate) * up`` is fused, so only I columns per slot are written).
* GEMM2 (w2, ``[E, H, I]``): reads ``u`` experts' weights and scales, the intermediate
  ``[M*top_k, I]``, and writes the output ``[M, H]``.

``u`` is the number of distinct experts touched: exact when the routing is known, otherwise
its expectation under uniform routing ``E * (1 - (1 - top_k/E)^M)``. Bytes of one GEMM with
N output features and K reduction, the weights in int4 (DESIGN.md section 7)::

    u*N*K/2 + u*N*(K/G)*s (+ u*N*(K/G) zero points) + rows_in*K*a + rows_out*N_out*a

with ``s`` the scale and ``a`` the activation element size. The same formula with 16-bit
weights (``u*N*K*2``, no scales) gives the bytes a bf16 layer streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import MoEShape

WEIGHT_FORMATS = ("int4", "bf16")


def expected_experts(num_experts: int, top_k: int, m: int) -> float:
    """Expected distinct experts touched by ``m`` tokens routed uniformly to ``top_k`` of
    ``num_experts``: ``E * (1 - (1 - top_k/E)^M)``."""
    if m <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** m)


def distinct_experts(topk_ids, expert_map=None) -> int:
    """Exact distinct experts of a routing ``topk_ids [M, top_k]`` (local ones only when an
    ``expert_map`` [E] maps experts off this rank to -1)."""
    import torch

    ids = torch.unique(topk_ids.reshape(-1).to(torch.int64))
    if expert_map is not None:
        ids = ids[expert_map.to(ids.device, torch.int64)[ids] >= 0]
    return int(ids.numel())


def gemm_bytes(u: float, n: int, k: int, group_size: int, rows_in: int, rows_out: int,
               n_out: int | None = None, dtype_bytes: int = 2, weight_format: str = "int4",
               zeros: bool = False) -> float:
    """Bytes one expert GEMM moves: ``u`` experts' ``[N, K]`` weights (+ scales, zeros), the
    ``[rows_in, K]`` input and the ``[rows_out, n_out]`` output (``n_out`` defaults to N)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format is {weight_format!r}; expected one of {WEIGHT_FORMATS}")
    n_out = n if n_out is None else n_out
    if weight_format == "int4":
        groups = k // group_size
        weights = u * n * k / 2 + u * n * groups * dtype_bytes + (u * n * groups if zeros else 0)
    else:
        weights = u * n * k * dtype_bytes
    return weights + rows_in * k * dtype_bytes + rows_out * n_out * dtype_bytes


def layer_bytes(shape: MoEShape, m: int, dtype_bytes: int = 2, u: float | None = None,
                weight_format: str = "int4", zeros: bool = False) -> float:
    """Bytes both GEMMs of one layer move for ``m`` tokens (``u`` distinct experts; default:
    the uniform-routing expectation)."""
    if u is None:
        u = expected_experts(shape.num_experts, shape.top_k, m)
    h, i, top_k = shape.hidden_size, shape.intermediate_size, shape.top_k
    g1 = gemm_bytes(u, 2 * i, h, shape.group_for(h), rows_in=m, rows_out=m * top_k, n_out=i,
                    dtype_bytes=dtype_bytes, weight_format=weight_format, zeros=zeros)
    g2 = gemm_bytes(u, h, i, shape.group_for(i), rows_in=m * top_k, rows_out=m,
                    dtype_bytes=dtype_bytes, weight_format=weight_format, zeros=zeros)
    return g1 + g2


def layer_flops(shape: MoEShape, m: int) -> float:
    """Multiply-add flops of both GEMMs: ``2 * M * top_k * (2I*H + I*H)``."""
    h, i = shape.hidden_size, shape.intermediate_size
    return 2.0 * m * shape.top_k * (2 * i * h + i * h)


@dataclass(frozen=True)
class Floor:
    """Lower bound of one layer's time on a device."""

    bytes: float
    flops: float
    memory_us: float
    compute_us: float

    @property
    def us(self) -> float:
        return max(self.memory_us, self.compute_us)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_us >= self.compute_us else "compute"


def layer_floor(shape: MoEShape, m: int, read_gbps: float, matmul_tflops: float,
                dtype_bytes: int = 2, u: float | None = None, weight_format: str = "int4",
                zeros: bool = False) -> Floor:
    """``max(bytes / bandwidth, flops / matmul rate)`` for ``m`` tokens, with the bandwidth
    in GB/s (1e9 bytes/s) and the matmul rate in TFLOP/s, both measured on the device."""
    if read_gbps <= 0 or matmul_tflops <= 0:
        raise ValueError(f"read_gbps={read_gbps} and matmul_tflops={matmul_tflops}; expected "
                         "positive measured rates")
    nbytes = layer_bytes(shape, m, dtype_bytes, u, weight_format, zeros)
    flops = layer_flops(shape, m)
    return Floor(bytes=nbytes, flops=flops, memory_us=nbytes / (read_gbps * 1e3),
                 compute_us=flops / (matmul_tflops * 1e6))
