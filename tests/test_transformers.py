"""transformers 5.x integration: swapped MoE blocks, quantized checkpoints, generation.

Every supported family is built in code at a tiny size (hidden 64, 4-8 experts, 2 layers,
I = 32 or 64 so groups of 32 divide everything), in fp16 (the kernels run under the Triton
interpreter on CPU, where bf16 arithmetic is wrong), on ``conftest.DEVICE``: the GPU when
present (compiled kernels), else the CPU. Checkpoints are written from CPU copies of the
tensors; the few tests without kernels (router math, float32 greedy runner, quantize on
load) stay on the CPU. The int4 model is compared with the
same transformers model whose experts hold the dequantized int4 weights, so only the
kernels' rounding differs: logits agree within ``atol = rtol = 1e-2`` (observed ~1e-3 on
logits of magnitude ~1.5), and the experts' contribution is checked to be far larger than
that tolerance (a model with zeroed experts is far off).
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import DEVICE

transformers = pytest.importorskip("transformers")

from formats_helpers import (  # noqa: E402
    EXPERT_NAMES,
    gptq_projection,
    quant_config,
    write_checkpoint,
)

from w4a16moe.integrations.e2e import GreedyRunner  # noqa: E402
from w4a16moe.integrations.transformers import (  # noqa: E402
    _MODULES,
    FAMILIES,
    FUSABLE_ROUTERS,
    FusedTopKRouter,
    W4A16Experts,
    cache_kwarg,
    find_moe_blocks,
    load_quantized,
    prepare_for_cuda_graphs,
    quantize_model,
    routing_kwargs,
    swapped_experts,
)

DTYPE = torch.float16
VOCAB = 96
G = 32
TOL = dict(atol=1e-2, rtol=1e-2)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, head_dim=8, n_shared_experts=1, first_k_dense_replace=1,
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2)
TINY = {
    "qwen3_moe": dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, intermediate_size=96, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      intermediate_size=96, shared_expert_intermediate_size=64,
                      norm_topk_prob=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    # one group of two experts eligible: the grouped choice differs from the plain top-2
    "deepseek_v2": dict(_MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                        topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(_MLA, q_lora_rank=32, routed_scaling_factor=2.5, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}
assert set(TINY) == set(FAMILIES)


def tiny_config(model_type: str):
    return transformers.CONFIG_MAPPING[model_type](**{**COMMON, **TINY[model_type]})


def make_model(model_type: str, seed: int = 0, dtype: torch.dtype = DTYPE,
               device: str = DEVICE):
    """A tiny model on ``device`` with random weights large enough that routing and experts
    matter (drawn on the CPU, so they do not depend on the device)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1 if "experts" in name else 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return model.to(device).eval()


def random_ids(low: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Token ids in ``[low, VOCAB)`` drawn on the CPU, moved to ``DEVICE``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, shape, generator=gen).to(DEVICE)


def use_dequantized_experts(ref, quantized) -> None:
    """Put the dequantized int4 experts of ``quantized`` into ``ref``'s float experts."""
    swapped = {r.layer: r.experts for r in find_moe_blocks(quantized, include_swapped=True)}
    blocks = find_moe_blocks(ref)
    assert blocks and sorted(swapped) == [r.layer for r in blocks]
    for r in blocks:
        w13, w2 = swapped[r.layer].dequantized(torch.float32)
        with torch.no_grad():
            r.experts.gate_up_proj.copy_(w13)
            r.experts.down_proj.copy_(w2)


def zero_experts(model):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for r in find_moe_blocks(out):
            r.experts.gate_up_proj.zero_()
            r.experts.down_proj.zero_()
    return out


@torch.no_grad()
def prefill_and_step(model, ids):
    """Logits of a prefill over ``ids`` and of one decode step after it."""
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    cache = getattr(out, "cache", None) or out.past_key_values
    step = model(nxt, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits.float(), step.logits.float(), nxt


@torch.no_grad()
def assert_matches(model, ref, ids, decode: bool = False) -> None:
    """Logits of ``model`` and ``ref`` agree on a prefill over ``ids`` (and, with ``decode``,
    on one decode step after it, fed the same token), and the experts matter."""
    if decode:
        pre, dec, nxt = prefill_and_step(model, ids)
    else:
        pre = model(ids).logits.float()
    pre_ref = ref(ids).logits.float()
    torch.testing.assert_close(pre, pre_ref, **TOL)
    if decode:
        out = ref(ids, use_cache=True)
        c = getattr(out, "cache", None) or out.past_key_values
        dec_ref = ref(nxt, use_cache=True, **{cache_kwarg(ref): c}).logits.float()
        torch.testing.assert_close(dec, dec_ref, **TOL)
    # the experts matter far beyond the tolerance
    off = zero_experts(ref)(ids).logits.float()
    assert (off - pre_ref).abs().max() > 20 * TOL["atol"]


# --------------------------------------------------------------------------------------------
# quantize_model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_quantize_model_matches_dequantized_reference(model_type):
    model = make_model(model_type)
    ref = copy.deepcopy(model)
    blocks = find_moe_blocks(model)
    fam = FAMILIES[model_type]
    kept = {r.layer: [id(getattr(r.block, a)) for a in fam.kept] for r in blocks}
    routers = {r.layer: getattr(r.block, fam.router) for r in blocks}
    # decode_threshold=1: the one-token step runs the decode kernel, the prompt the prefill one
    quantize_model(model, group_size=G, decode_threshold=1)
    after = find_moe_blocks(model, include_swapped=True)
    assert [r.layer for r in after] == sorted(kept)
    for r in after:
        assert isinstance(r.experts, W4A16Experts)
        assert r.experts.moe.choose_path(1) == "decode"
        assert r.experts.moe.choose_path(6) == "prefill"
        assert [id(getattr(r.block, a)) for a in fam.kept] == kept[r.layer]
        # the router is kept, or (softmax top-k families) computed by one kernel with the
        # same weight
        old, new = routers[r.layer], getattr(r.block, fam.router)
        if type(old).__name__ in FUSABLE_ROUTERS:
            assert isinstance(new, FusedTopKRouter) and new.weight is old.weight
        else:
            assert new is old
    assert not [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj",
                                                                      "down_proj"))]
    use_dequantized_experts(ref, model)
    ids = random_ids(0, (1, 6), 1)
    # the prompt runs the prefill kernel; one family also checks a decode-kernel step
    assert_matches(model, ref, ids, decode=model_type in ("qwen3_moe", "deepseek_v3"))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_routing_kwargs_reproduce_the_routers(model_type):
    from w4a16moe.routing import fused_topk

    model = make_model(model_type, seed=23, dtype=torch.float32, device="cpu")
    fam = FAMILIES[model_type]
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(24))
    for ref in find_moe_blocks(model):
        router = getattr(ref.block, fam.router)
        with torch.no_grad():
            outs = router(x)
        ids = next(t for t in outs if not t.dtype.is_floating_point)
        weights = next(t for t in outs if t.dtype.is_floating_point and t.shape == ids.shape)
        logits = next(t for t in outs if t.dtype.is_floating_point and t.shape != ids.shape)
        got_w, got_ids = fused_topk(logits, **routing_kwargs(model.config, router))
        order, got_order = ids.sort(dim=-1), got_ids.long().sort(dim=-1)
        assert torch.equal(order.values, got_order.values)
        torch.testing.assert_close(got_w.gather(1, got_order.indices),
                                   weights.float().gather(1, order.indices),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_router_reproduces_the_router(model_type, dtype):
    """fuse_routers swaps exactly the softmax top-k routers; the fused one returns the same
    logits, indices (int64, same order) and scores (same dtype) as the original."""
    from w4a16moe.integrations.transformers import fuse_routers

    model = make_model(model_type, seed=31, dtype=dtype, device=DEVICE)
    fam = FAMILIES[model_type]
    refs = find_moe_blocks(model)
    originals = [getattr(r.block, fam.router) for r in refs]
    keys = set(model.state_dict())
    n = fuse_routers(model)
    fusable = type(originals[0]).__name__ in FUSABLE_ROUTERS
    assert n == (len(refs) if fusable else 0)
    assert set(model.state_dict()) == keys  # same parameter names: checkpoints still load
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(32)).to(DEVICE, dtype)
    for ref, old in zip(refs, originals, strict=True):
        new = getattr(ref.block, fam.router)
        if not fusable:
            assert new is old
            continue
        assert isinstance(new, FusedTopKRouter) and new.weight is old.weight
        with torch.no_grad():
            lo, so, io = old(x)
            ln, sn, i_n = new(x)
        assert torch.equal(ln, lo) and sn.dtype == so.dtype and i_n.dtype == io.dtype
        assert torch.equal(i_n, io)
        torch.testing.assert_close(sn, so, atol=1e-6, rtol=1e-5 if dtype == torch.float32
                                   else 1e-3)


def test_quantize_model_asymmetric_batch_and_generate():
    model = make_model("qwen3_moe", seed=3)
    ref = copy.deepcopy(model)
    quantize_model(model, group_size=G, symmetric=False, decode_threshold=1)
    assert any(m.packed.w13.zeros is not None for m in model.modules()
               if isinstance(m, W4A16Experts))
    use_dequantized_experts(ref, model)
    ids = random_ids(3, (2, 4), 2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float(), **TOL)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert out.shape == (2, 7) and torch.equal(out[:, :4], ids)


def test_quantize_model_errors():
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4)
    dense = transformers.AutoModelForCausalLM.from_config(llama)
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        quantize_model(dense)
    model = make_model("mixtral")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: .*group_size"):
        quantize_model(model, group_size=128)  # H = 64 is not a multiple of 128
    quantize_model(model, group_size=-1)  # per channel works
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)


def test_compile_fullgraph():
    model = make_model("qwen3_moe", seed=4)
    quantize_model(model, group_size=G, decode_threshold=1)
    ids = random_ids(0, (1, 5), 5)
    graphs = []

    def backend(gm, example_inputs):  # record the graph, then AOT-trace it (fake tensors)
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            got = compiled(ids).logits
            want = model(ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    # one graph, the kernels as the opaque custom op once per MoE layer
    assert len(graphs) == 1 and graphs[0].count("w4a16moe.moe_experts") == 2


def test_copies_get_their_own_op_handle():
    model = make_model("olmoe", seed=22)
    quantize_model(model, group_size=G)
    clone = copy.deepcopy(model)
    mine, theirs = swapped_experts(model), swapped_experts(clone)
    assert len(mine) == len(theirs) == 2
    assert {m._handle for m in mine}.isdisjoint({m._handle for m in theirs})
    assert all(_MODULES[m._handle] is m for m in mine + theirs)


def test_greedy_runner_matches_generate():
    # float32 model on the CPU, no kernels: the runner's static cache + explicit masks are
    # exact
    model = make_model("qwen2_moe", seed=6, dtype=torch.float32, device="cpu")
    ids = random_ids(3, (1, 5), 7).cpu()
    want = model.generate(ids, max_new_tokens=5, do_sample=False)[:, 5:]
    runner = GreedyRunner(model, max_len=10)
    got, timing = runner.generate(ids, 5)
    assert torch.equal(got, want)
    assert timing.decode_steps == 4 and timing.ttft_ms > 0 and timing.tpot_ms > 0
    again, _ = runner.generate(ids, 5)  # the runner resets its cache and buffers
    assert torch.equal(again, want)
    with pytest.raises(ValueError, match="exceed the cache length"):
        runner.generate(ids, 6)
    with pytest.raises(ValueError, match="cuda_graphs needs"):
        GreedyRunner(model, 10, cuda_graphs=True)


def test_greedy_runner_int4():
    model = make_model("olmoe", seed=8)
    quantize_model(model, group_size=G, decode_threshold=1)
    assert prepare_for_cuda_graphs(model, 4) == 2
    ids = random_ids(3, (1, 4), 9)
    want = model.generate(ids, max_new_tokens=2, do_sample=False)[:, 4:]
    got, _ = GreedyRunner(model, max_len=6).generate(ids, 2)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# load_quantized: GPTQ checkpoints written from the format's definition (formats_helpers)
# --------------------------------------------------------------------------------------------
def _checkpoint_name(model_type: str, name: str) -> str:
    """Where the original checkpoints store a non-expert tensor of the 5.x model."""
    if model_type == "mixtral":
        return name.replace(".mlp.", ".block_sparse_moe.")
    if model_type == "granitemoe":
        return name.replace(".router.weight", ".router.layer.weight")
    return name


def write_gptq_checkpoint(path: str, model, *, sym: bool = True, quantize_attention=False,
                          seed: int = 0):
    """Write ``model`` as a GPTQ (v1) checkpoint: random int4 experts (per-expert modules in
    the family's checkpoint names), the rest as stored in fp16 (``q/k/v/o_proj`` int4 too
    when ``quantize_attention``). Returns the reference: ``model`` with the exact
    dequantized weights in place of the float ones."""
    rng = np.random.default_rng(seed)
    mt = model.config.model_type
    ref = copy.deepcopy(model)
    tensors: dict[str, torch.Tensor] = {}
    moe = {r.layer: r for r in find_moe_blocks(ref)}
    experts_prefixes = tuple(f"{r.name}.experts." for r in moe.values())
    quantized_linear = ("q_proj", "k_proj", "v_proj", "o_proj") if quantize_attention else ()
    ref_params = dict(ref.named_parameters())
    for name, t in ref.state_dict().items():
        if name.startswith(experts_prefixes) or "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embedding: checkpoints leave it out
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in quantized_linear:
            n, k = t.shape
            parts, w = gptq_projection(n, k, G, sym, True, None, rng)
            tensors.update({f"{module}.{s}": v for s, v in parts.items()})
            with torch.no_grad():
                ref_params[name].copy_(w)
            continue
        tensors[_checkpoint_name(mt, name)] = t.detach().cpu().clone()
    module_fmt, (gate, up, down) = EXPERT_NAMES[mt]
    for layer, r in moe.items():
        e, two_i, h = r.experts.gate_up_proj.shape
        i = two_i // 2
        for ex in range(e):
            mod = module_fmt.format(L=layer, e=ex)
            ws = {}
            for proj, n, k in ((gate, i, h), (up, i, h), (down, h, i)):
                parts, w = gptq_projection(n, k, G, sym, True, None, rng)
                tensors.update({f"{mod}.{proj}.{s}": v for s, v in parts.items()})
                ws[proj] = w
            with torch.no_grad():
                r.experts.gate_up_proj[ex].copy_(torch.cat([ws[gate], ws[up]]))
                r.experts.down_proj[ex].copy_(ws[down])
    cfg = model.config.to_dict()
    if mt in ("qwen3_moe", "qwen2_moe", "olmoe"):
        cfg["num_experts"] = model.config.num_experts  # the key real checkpoints use
    cfg["quantization_config"] = quant_config("gptq", G, sym, False)
    write_checkpoint(path, cfg, tensors)
    return ref.eval(), tensors, cfg


# the other families store their experts under the same names as qwen3_moe (formats tests)
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "granitemoe"])
def test_load_quantized_gptq(tmp_path, model_type):
    model = make_model(model_type, seed=10)
    path = str(tmp_path / model_type)
    attn = model_type == "qwen3_moe"  # quantized attention is dequantized on load
    ref, _, _ = write_gptq_checkpoint(path, model, sym=model_type != "olmoe",
                                      quantize_attention=attn, seed=11)
    loaded = load_quantized(path, device=DEVICE, dtype=DTYPE, decode_threshold=1)
    assert len(find_moe_blocks(loaded, include_swapped=True)) == len(find_moe_blocks(ref))
    assert all(isinstance(r.experts, W4A16Experts)
               for r in find_moe_blocks(loaded, include_swapped=True))
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    ids = random_ids(3, (1, 6), 12)
    assert_matches(loaded, ref, ids, decode=model_type == "qwen3_moe")
    if model_type == "qwen3_moe":
        out = loaded.generate(ids, max_new_tokens=2, do_sample=False)
        assert out.shape == (1, 8) and torch.equal(out[:, :6], ids)


def test_load_quantized_tied_embeddings_and_buffers(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.CONFIG_MAPPING["deepseek_v3"](**{**COMMON, **TINY["deepseek_v3"],
                                                      "tie_word_embeddings": True}),
        dtype=DTYPE).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.2, 0.2)
    path = str(tmp_path / "tied")
    ref, tensors, _ = write_gptq_checkpoint(path, model.eval(), seed=13)
    assert "lm_head.weight" not in tensors
    loaded = load_quantized(path, device=DEVICE, dtype=DTYPE, decode_threshold=1)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    bias_name = "model.layers.1.mlp.gate.e_score_correction_bias"
    torch.testing.assert_close(dict(loaded.named_buffers())[bias_name].float().cpu(),
                               tensors[bias_name].float())
    ids = random_ids(3, (1, 5), 14)
    assert_matches(loaded, ref, ids)


def _rewrite(path: str, tensors: dict, cfg: dict) -> None:
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(path, f))
    write_checkpoint(path, cfg, tensors)


def test_load_quantized_errors(tmp_path):
    model = make_model("qwen3_moe", seed=15)
    path = str(tmp_path / "ckpt")
    _, tensors, cfg = write_gptq_checkpoint(path, model, seed=16)
    # a tensor the model needs
    t = dict(tensors)
    del t["model.norm.weight"]
    _rewrite(path, t, cfg)
    with pytest.raises(ValueError, match=r"lacks tensors .*model\.norm\.weight"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    # an expert tensor
    t = dict(tensors)
    del t["model.layers.1.mlp.experts.3.down_proj.qweight"]
    _rewrite(path, t, cfg)
    with pytest.raises(ValueError, match=r"missing expert tensor "
                                         r"model\.layers\.1\.mlp\.experts\.3\.down_proj"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    # a shape that does not fit
    t = dict(tensors)
    t["model.norm.weight"] = torch.ones(32, dtype=DTYPE)
    _rewrite(path, t, cfg)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(32,\); expected "
                                         r"\(64,\)"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    # tensors the model does not use: warned about, except layers past num_hidden_layers
    # (DeepSeek-V3's multi-token-prediction layer)
    t = dict(tensors)
    t["model.layers.0.mlp.stray.weight"] = torch.ones(4, dtype=DTYPE)
    t["model.layers.2.self_attn.q_proj.weight"] = torch.ones(4, dtype=DTYPE)
    _rewrite(path, t, cfg)
    with pytest.warns(UserWarning, match=r"not used by the qwen3_moe model: "
                                         r"model\.layers\.0\.mlp\.stray\.weight$"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    # unsupported family
    _rewrite(path, tensors, {**cfg, "model_type": "llama"})
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    # a bad dtype
    with pytest.raises(ValueError, match="expected torch.float16 or torch.bfloat16"):
        load_quantized(path, device="cpu", dtype=torch.float32)


def test_load_unquantized_experts(tmp_path):
    # no quantization config: experts are quantized on load with G=128, so H = I = 128
    torch.manual_seed(17)
    cfg = tiny_config("granitemoe")
    cfg.hidden_size = cfg.intermediate_size = 128
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    path = str(tmp_path / "bf16")
    model.save_pretrained(path)  # transformers writes Granite's original (fused) names
    with pytest.raises(ValueError, match="stored unquantized.*quantize_unquantized=True"):
        load_quantized(path, device="cpu", dtype=DTYPE)
    loaded = load_quantized(path, device="cpu", dtype=DTYPE, quantize_unquantized=True)
    # the same round-to-nearest codes and scales as quantize_model on the loaded model
    quantize_model(model, group_size=128)
    want = {r.layer: r.experts.packed for r in find_moe_blocks(model, include_swapped=True)}
    got = {r.layer: r.experts.packed for r in find_moe_blocks(loaded, include_swapped=True)}
    assert sorted(got) == sorted(want) == [0, 1]
    for layer, pe in got.items():
        for a, b in ((pe.w13, want[layer].w13), (pe.w2, want[layer].w2)):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
            assert a.zeros is None and b.zeros is None and a.group_size == b.group_size == 128
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# w4a16moe generate
# --------------------------------------------------------------------------------------------
def save_word_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                pad_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(path)


def _generate_args(argv):
    from w4a16moe import generate

    parser = argparse.ArgumentParser(prog="w4a16moe")
    generate.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_generate_cli(tmp_path, capsys):
    model = make_model("mixtral", seed=19)
    path = str(tmp_path / "mixtral-gptq")
    write_gptq_checkpoint(path, model, seed=20)
    args = _generate_args([path, "--prompt", "w5 w6 w7", "--max-new-tokens", "2",
                           "--device", DEVICE, "--decode-threshold", "1"])
    with pytest.raises(ValueError, match="has no tokenizer"):
        args.func(args)
    save_word_tokenizer(path)
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "TTFT" in err and "TPOT" in err and "2 tokens generated" in err
    words = out.split()
    assert all(w.startswith("w") and w[1:].isdigit() for w in words) and len(words) <= 2


def test_generate_cli_quantize(tmp_path, capsys):
    model = make_model("qwen3_moe", seed=21)
    path = str(tmp_path / "bf16")
    model.save_pretrained(path)
    save_word_tokenizer(path)
    with open(os.path.join(path, "config.json")) as fh:
        assert "quantization_config" not in json.load(fh)
    args = _generate_args([path, "--prompt", "w9 w10", "--max-new-tokens", "2", "--device",
                           DEVICE, "--quantize", "--group-size", "32", "--decode-threshold", "1"])
    assert args.func(args) == 0
    assert "2 tokens generated" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        a = _generate_args([path, "--prompt", "w1", "--device", "cpu", "--cuda-graphs"])
        a.func(a)
