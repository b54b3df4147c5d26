"""w4a16moe: fast Mixture-of-Experts layers with 4-bit integer expert weights."""

from .experts import HybridW4A16MoEExperts
from .layout import (
    PackedExperts,
    PackedWeights,
    load_packed,
    pack_int4,
    packed_file_metadata,
    save_packed,
    unpack_int4,
)
from .quantize import quantize_experts, quantize_weights, random_experts

__version__ = "0.1.0"

__all__ = [
    "HybridW4A16MoEExperts",
    "PackedExperts",
    "PackedWeights",
    "load_packed",
    "pack_int4",
    "packed_file_metadata",
    "quantize_experts",
    "quantize_weights",
    "random_experts",
    "save_packed",
    "unpack_int4",
]
