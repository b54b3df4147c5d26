"""Front ends to other libraries.

* :mod:`.transformers`: Hugging Face transformers 5.x MoE models with int4 routed experts
  (:func:`quantize_model` for a loaded model, :func:`load_quantized` for a GPTQ / AWQ /
  compressed-tensors checkpoint).
* :mod:`.e2e`: end-to-end generation timing (TTFT / TPOT, bf16 vs int4, eager vs CUDA graphs).

Nothing here imports the transformers library until a function needs it.
"""

from .transformers import (
    W4A16Experts,
    load_quantized,
    prepare_for_cuda_graphs,
    quantize_model,
)

__all__ = ["W4A16Experts", "load_quantized", "prepare_for_cuda_graphs", "quantize_model"]
