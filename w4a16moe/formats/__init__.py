"""Converters from quantized Hugging Face MoE checkpoints (GPTQ, AWQ GEMM, compressed-tensors
pack-quantized) into the packed layout (:class:`~w4a16moe.layout.PackedExperts`).

>>> layers = load_checkpoint("Qwen3-30B-A3B-GPTQ-Int4", device="cuda")   # {layer: experts}
>>> report = convert_checkpoint("Qwen3-30B-A3B-GPTQ-Int4", "qwen3-experts.safetensors")
"""

from .checkpoint import (
    Checkpoint,
    ConversionReport,
    SkippedModule,
    TensorStore,
    convert_checkpoint,
    load_checkpoint,
    read_checkpoint,
)
from .families import FAMILIES, Family, family_for
from .quant_config import QuantConfig, WeightScheme, read_quant_config

__all__ = [
    "FAMILIES",
    "Checkpoint",
    "ConversionReport",
    "Family",
    "QuantConfig",
    "SkippedModule",
    "TensorStore",
    "WeightScheme",
    "convert_checkpoint",
    "family_for",
    "load_checkpoint",
    "read_checkpoint",
    "read_quant_config",
]
