"""Layer paths for A/Bs of the decode kernels' card-dependent picks, through
``w4a16moe bench``'s ad-hoc paths (weights rotated, CUDA graphs, router included, checked
against the float32 oracle)::

    PYTHONPATH=.:benchmarks w4a16moe bench --model mixtral-8x7b --m 1,2,4 \\
        --paths a=decode_ab:decode_by_card,b=decode_ab:decode_ring_64_word_steps,\\
a2=decode_ab:decode_by_card

:func:`decode_by_card` is the shipped decode layer (``fused_moe_decode``), whose ``cp.async``
ring tiles take 128-word steps on cards whose SMs each have
``decode.WIDE_RING_MIN_SM_READ_RATE`` of DRAM rate or more (session 40);
:func:`decode_ring_64_word_steps` keeps the 64-word steps on every card (the picks before);
:func:`decode_wide_ring_from_2_5_waves` takes GEMM1's ring tile with 128-word steps only
from 2.5 waves of warps, as the 64-word one (the picks of session 40's first commit)."""

from __future__ import annotations

from unittest import mock

from w4a16moe.kernels import decode as decode_mod
from w4a16moe.kernels.decode import fused_moe_decode


def decode_by_card(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped decode layer."""
    return fused_moe_decode(hidden_states, experts, topk_weights, topk_ids,
                            activation=activation)


def decode_ring_64_word_steps(hidden_states, experts, topk_weights, topk_ids, *,
                              activation="silu"):
    """The decode layer with the ring tiles' 64-word steps whatever the card's rate."""
    with mock.patch.object(decode_mod, "WIDE_RING_MIN_SM_READ_RATE", float("inf")):
        return fused_moe_decode(hidden_states, experts, topk_weights, topk_ids,
                                activation=activation)


def decode_wide_ring_from_2_5_waves(hidden_states, experts, topk_weights, topk_ids, *,
                                    activation="silu"):
    """The decode layer with GEMM1's 128-word ring tile only from 2.5 waves of warps."""
    with mock.patch.object(decode_mod, "GEMM1_WIDE_RING_MIN_WAVES",
                           decode_mod.GEMM1_RING_MIN_WAVES):
        return fused_moe_decode(hidden_states, experts, topk_weights, topk_ids,
                                activation=activation)
