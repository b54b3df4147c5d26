"""Benchmarks of the MoE layer: shapes of real models, byte/flop floors, CUDA-graph timing
with a cold L2, the bf16 baselines and the ``w4a16moe bench`` command.

    from w4a16moe.bench import bench_layer, get_shape
    records = bench_layer(get_shape("qwen3-30b-a3b"), [1, 2, 4, 8], ["decode", "bf16"])
"""

from .floors import expected_experts, layer_bytes, layer_floor, layer_flops
from .layer import RECORD_KEYS, bench_layer, cold_vs_warm
from .models import MODELS, MoEShape, get_shape, shape_from_config
from .paths import PATHS, PathSpec, register_path
from .timing import measure_device, time_calls

__all__ = [
    "MODELS", "PATHS", "RECORD_KEYS", "MoEShape", "PathSpec", "bench_layer", "cold_vs_warm",
    "expected_experts", "get_shape", "layer_bytes", "layer_floor", "layer_flops",
    "measure_device", "register_path", "shape_from_config", "time_calls",
]
