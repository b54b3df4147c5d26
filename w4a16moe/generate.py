"""``w4a16moe generate``: greedy text generation with int4 experts, with TTFT and TPOT.

``CHECKPOINT`` is a quantized MoE checkpoint directory (GPTQ, AWQ, compressed-tensors: loaded
with :func:`~w4a16moe.integrations.transformers.load_quantized`) or, with ``--quantize``, a
bf16 Hugging Face model directory whose experts are quantized after loading
(:func:`~w4a16moe.integrations.transformers.quantize_model`). The tokenizer must be in the
same directory. Generation is greedy on a static KV cache
(:class:`~w4a16moe.integrations.e2e.GreedyRunner`), optionally replayed from CUDA graphs;
exactly ``--max-new-tokens`` tokens are generated and the text is cut at the first EOS.
"""

from __future__ import annotations

import argparse
import os
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def load_tokenizer(path: str):
    """The tokenizer stored in ``path``; ``ValueError`` when there is none."""
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise ValueError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy "
                         "the tokenizer files of the original model into the checkpoint "
                         "directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError / ValueError / ImportError ...
        raise ValueError(f"cannot load the tokenizer in {path}: {type(exc).__name__}: "
                         f"{exc}") from exc


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def load_model(path: str, device, dtype, quantize: bool, group_size: int,
               decode_threshold: int | None = None):
    """The model of ``path`` with int4 experts (see the module docstring)."""
    from .integrations.transformers import load_quantized, quantize_model

    if not quantize:
        return load_quantized(path, device=device, dtype=dtype,
                              decode_threshold=decode_threshold)
    from transformers import AutoModelForCausalLM

    from .formats import read_quant_config

    if read_quant_config(path) is not None:
        raise ValueError(f"{path} is a quantized checkpoint; drop --quantize to load it "
                         "(--quantize is for bf16 models)")
    try:  # straight onto the device
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    except (ImportError, ValueError, TypeError):  # no device_map support: load, then move
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return quantize_model(model, group_size=group_size, decode_threshold=decode_threshold)


def run(args) -> int:
    import torch

    from .integrations.e2e import GreedyRunner

    path = args.checkpoint
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is not a directory")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens is {args.max_new_tokens}; expected >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp16")])
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, dtype, args.quantize, args.group_size,
                       args.decode_threshold)
    prompt = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer in {path} has no chat template")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    runner = GreedyRunner(model, ids.shape[1] + args.max_new_tokens, 1, args.cuda_graphs)
    if args.warmup and (args.cuda_graphs or device.type == "cuda"):
        runner.generate(ids, args.max_new_tokens)  # compile kernels / capture graphs
    tokens, timing = runner.generate(ids, args.max_new_tokens)
    out = tokens[0].tolist()
    eos = _eos_ids(tokenizer, model)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    text = tokenizer.decode(out[:cut], skip_special_tokens=True)
    print(text)
    tpot = timing.tpot_ms
    mode = "CUDA graphs" if args.cuda_graphs else "eager"
    print(f"\nTTFT {timing.ttft_ms:.2f} ms ({ids.shape[1]} prompt tokens), TPOT "
          + (f"{tpot:.2f} ms" if tpot is not None else "-")
          + f" ({len(out)} tokens generated, {cut} shown; {mode}, {device}, "
          f"{str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text greedily with int4 experts and print TTFT / TPOT",
        description="Load a quantized MoE checkpoint (GPTQ / AWQ / compressed-tensors; or a "
                    "bf16 model with --quantize), generate greedily on a static KV cache and "
                    "print the text, then the time to first token (TTFT) and per output token "
                    "(TPOT) on stderr. The tokenizer must be in the checkpoint directory.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate (default 64; exactly this many are computed)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default bf16 on a GPU, fp16 on the CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the prefill and decode steps from CUDA graphs")
    p.add_argument("--quantize", action="store_true",
                   help="CHECKPOINT is a bf16 model: quantize its experts after loading")
    p.add_argument("--group-size", type=int, default=128,
                   help="group size for --quantize (default 128; -1 per channel)")
    p.add_argument("--decode-threshold", type=int, default=None,
                   help="largest token count run by the decode kernel (default: measured)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time the first generation (kernel compilation included)")
    p.set_defaults(func=run)


if __name__ == "__main__":  # python -m w4a16moe.generate CHECKPOINT --prompt ...
    parser = argparse.ArgumentParser(prog="w4a16moe")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["generate", *sys.argv[1:]])
    sys.exit(ns.func(ns))
