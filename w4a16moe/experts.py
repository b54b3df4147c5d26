"""``HybridW4A16MoEExperts``: the experts of one MoE layer, decode or prefill kernel by M.

GEMM1 (w13) -> activation -> GEMM2 (w2) -> top-k weighted sum. Few tokens run the split-K
decode kernel (weights streamed at memory bandwidth, no alignment pass); many tokens run the
grouped-GEMM prefill kernel. The switch point (``decode_threshold``: the largest M that runs
the decode kernel) comes from a measurement on the GPU, shipped per GPU and shape in
``kernels/configs/<gpu>_thresholds.json`` (``w4a16moe tune`` writes it), unless given.

Where it measured faster (few, large experts with a long K on a card whose CUDA cores cannot
keep up with its memory: Mixtral at one token on the H200), the top of the decode range runs
the *mixed* path instead (:mod:`~w4a16moe.kernels.mixed`): GEMM1 on the grouped GEMM's
tensor-core tiles, GEMM2 on the decode kernel. Its lower bound (``decode_gemm1_threshold``:
the largest M whose GEMM1 runs the decode kernel) is measured and shipped the same way, in
the file's ``"decode_gemm1"`` section.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from .kernels.configs import THRESHOLDS_SUFFIX, gpu_file_name, tuned_file
from .layout import PackedExperts, PackedWeights
from .reference import ACTIVATIONS
from .routing import fused_topk

#: used when no measured threshold exists for the GPU and shape: the decode kernel streams
#: each active expert once per token, the prefill kernel once per block, so decode wins while
#: the tokens per expert stay small.
DEFAULT_DECODE_THRESHOLD = 32
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "kernels", "configs")
#: ``W4A16MOE_CHECK=1`` turns on the value checks of ``topk_ids`` for GPU tensors (a host
#: sync per forward); CPU tensors are always checked
CHECK_ENV = "W4A16MOE_CHECK"
#: the thresholds file's section of ``decode_gemm1_threshold`` values (same keys)
DECODE_GEMM1_SECTION = "decode_gemm1"
#: the paths ``forward`` runs (see ``choose_path``)
PATHS = ("decode", "mixed", "prefill")
#: the path of the deterministic mode, for every M: the grouped GEMM stays fast at large M,
#: where the decode kernel (one program per token) would stream the weights once per token
DETERMINISTIC_PATH = "prefill"


def thresholds_path(device_name: str) -> str:
    """This package's thresholds file of the GPU named ``device_name`` (where ``w4a16moe
    tune --thresholds`` writes)."""
    return os.path.join(CONFIG_DIR, gpu_file_name(device_name, THRESHOLDS_SUFFIX))


def threshold_key(num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
                  group_size: int) -> str:
    return f"E={num_experts},H={hidden_size},I={intermediate_size},top_k={top_k},G={group_size}"


@cache
def _read_thresholds(path: str, section: str | None = None) -> dict[str, int]:
    """``{threshold_key: M}`` of the file's top level, or of its ``section`` object."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        if section is not None:
            data = data.get(section, {})
            if not isinstance(data, dict):
                raise ValueError(f"{section!r} is not an object")
        return {str(k): int(v) for k, v in data.items()
                if not str(k).startswith("_") and k != DECODE_GEMM1_SECTION}
    except (OSError, ValueError, TypeError) as exc:
        what = (f"threshold {DEFAULT_DECODE_THRESHOLD}" if section is None
                else "decode GEMM1 everywhere (no mixed path)")
        where = "" if section is None else f"'s {section!r} section"
        warnings.warn(f"ignoring decode thresholds file {path}{where}: {exc}; using the "
                      f"default {what}", stacklevel=3)
        return {}


def measured_thresholds(experts: PackedExperts, top_k: int,
                        device: torch.device | None = None) -> tuple[int | None, int | None]:
    """``(decode_threshold, decode_gemm1_threshold)`` measured for this GPU and layer shape,
    from one lookup of its thresholds file (this GPU's, or a sibling's of the same
    architecture and size: see :func:`~w4a16moe.kernels.configs.tuned_file`); None for a
    value not shipped (no ``decode_gemm1`` value: the mixed path is never chosen)."""
    device = device or experts.device
    if device.type != "cuda":
        return None, None
    path = str(tuned_file(device, THRESHOLDS_SUFFIX))
    key = threshold_key(experts.num_experts, experts.hidden_size, experts.intermediate_size,
                        top_k, experts.w13.group_size)
    return (_read_thresholds(path).get(key),
            _read_thresholds(path, DECODE_GEMM1_SECTION).get(key))


def measured_decode_threshold(experts: PackedExperts, top_k: int,
                              device: torch.device | None = None) -> int | None:
    """The decode threshold of :func:`measured_thresholds`."""
    return measured_thresholds(experts, top_k, device)[0]


def _check_expert_map(expert_map: torch.Tensor, num_local: int) -> None:
    """Shape, dtype and (once, at construction) values of an ``expert_map``."""
    if not isinstance(expert_map, torch.Tensor):
        raise ValueError(f"expert_map is a {type(expert_map).__name__}; expected a 1-D int "
                         "torch.Tensor")
    if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_map has shape {tuple(expert_map.shape)} and dtype "
                         f"{expert_map.dtype}; expected a 1-D int32 tensor [num_global_experts]")
    if expert_map.numel() == 0:
        raise ValueError("expert_map is empty; expected one entry per global expert")
    lo, hi = int(expert_map.min()), int(expert_map.max())
    if lo < -1 or hi >= num_local:
        raise ValueError(f"expert_map ranges over [{lo}, {hi}]; expected local ids in "
                         f"[0, {num_local}) or -1")


@dataclass
class _ConfigNeeds:
    """What the prefill configs of every token count up to ``tokens`` need besides a
    workspace's fixed buffers, found by :meth:`HybridW4A16MoEExperts._config_needs`: rows for
    activations in sorted order (``SORTED_ROWS``: the most padded positions of any such
    launch), float32 elements for a split-K GEMM2's partial sums (``SPLIT_K``: splits x
    slots x H) and the largest Stream-K launch's float32 partials and tile counters
    (``STREAM_K``; see ``kernels.prefill_rs.stream_k_scratch``); 0 where none needs them."""

    tokens: int = 0
    sorted_rows: int = 0
    split_partials: int = 0
    stream_k_partials: int = 0
    stream_k_counters: int = 0


#: the scans of :meth:`HybridW4A16MoEExperts._config_needs`, shared by the modules whose
#: configs are the same (every layer of a model), so that reserving many layers' workspaces
#: looks each token count up once, not once a layer; keyed by ``_config_key``
_CONFIG_NEEDS: dict[tuple, _ConfigNeeds] = {}


class HybridW4A16MoEExperts(nn.Module):
    """The routed experts of one MoE layer with int4 weights.

    Args:
        experts: the packed weights (local experts when ``expert_map`` is given).
        top_k: experts per token.
        activation: ``"silu"`` (SiLU(gate) * up), ``"gelu"`` or ``"gelu_tanh"``.
        apply_router_weight_on_input: scale the input of GEMM1 by the router weight instead
            of GEMM2's output.
        expert_map: optional int32 ``[num_global_experts]`` global -> local expert id, -1 for
            experts not on this rank (they contribute nothing).
        decode_threshold: the largest token count that runs the decode kernel (default: the
            measured value for this GPU and shape, else ``DEFAULT_DECODE_THRESHOLD``).
        decode_gemm1_threshold: the largest token count whose GEMM1 also runs the decode
            kernel; token counts above it up to ``decode_threshold`` run the mixed path
            (GEMM1 on the prefill kernel's tensor-core tiles, GEMM2 on the decode kernel)
            where :func:`~w4a16moe.kernels.mixed.mixed_unsupported` allows, else decode.
            Default: the measured value for this GPU and shape, else ``decode_threshold``
            (no mixed path).
        deterministic: bitwise reproducible, batch-invariant results: no atomics, and one
            path (``DETERMINISTIC_PATH``, the prefill kernel) with one kernel config per
            layer shape for every M, so a token's output is bitwise the same alone or inside
            any batch. Costs time (benchmarks/RESULTS.md). ``forward(..., path="decode")``
            still works (atomic-free, batch invariant within the decode path) but its bits
            differ from the prefill path's: do not mix forced paths if you compare bits.
        validate: check the *values* of ``topk_ids`` (in ``[0, num_global_experts)``) on
            every forward, which reads them back to the host. Default (None): always for CPU
            tensors; for GPU tensors only when the environment has ``W4A16MOE_CHECK=1``.
            Never while a CUDA graph is being captured (a sync is not allowed there).

    ``forward(hidden_states [M, H], topk_weights [M, top_k], topk_ids [M, top_k]) -> [M, H]``.
    Shapes, dtypes and devices of the inputs are always checked (ValueError naming the
    tensor, the expected and the found value); non-contiguous inputs are accepted (copied to
    contiguous memory first). NaN/Inf in ``hidden_states`` propagate to the outputs of the
    affected tokens as in float arithmetic, never to other tokens. Workspaces are allocated
    on first use and reused; call :meth:`reserve` with the largest M before capturing a CUDA
    graph so that nothing is allocated inside the capture (pass contiguous inputs and
    ``out`` there too).
    """

    def __init__(self, experts: PackedExperts, top_k: int, *, activation: str = "silu",
                 apply_router_weight_on_input: bool = False,
                 expert_map: torch.Tensor | None = None,
                 decode_threshold: int | None = None,
                 decode_gemm1_threshold: int | None = None, deterministic: bool = False,
                 validate: bool | None = None) -> None:
        super().__init__()
        if not isinstance(experts, PackedExperts):
            raise ValueError(f"experts is a {type(experts).__name__}; expected PackedExperts")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
        if expert_map is not None:
            _check_expert_map(expert_map, experts.num_experts)
        num_global = experts.num_experts if expert_map is None else expert_map.shape[0]
        if not 1 <= top_k <= num_global:
            raise ValueError(f"top_k is {top_k}; expected 1 <= top_k <= {num_global} experts")
        for name, value in (("decode_threshold", decode_threshold),
                            ("decode_gemm1_threshold", decode_gemm1_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} is {value!r}; expected an int >= 0")
        self.top_k = top_k
        self.deterministic = bool(deterministic)
        self.validate = validate
        self.activation = activation
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self._threshold_arg = decode_threshold
        self._gemm1_threshold_arg = decode_gemm1_threshold
        self._meta = dict(num_experts=experts.num_experts, hidden_size=experts.hidden_size,
                          intermediate_size=experts.intermediate_size, dtype=experts.dtype)
        self._group_sizes = (experts.w13.group_size, experts.w2.group_size)
        for prefix, w in (("w13", experts.w13), ("w2", experts.w2)):
            for part in ("qweight", "scales", "zeros", "perm"):
                self.register_buffer(f"{prefix}_{part}", getattr(w, part))
        self.register_buffer("expert_map", None if expert_map is None
                             else expert_map.to(device=experts.device, dtype=torch.int32))
        self._experts = experts
        self._decode_ws = None
        self._mixed_ws = None
        self._mixed_why: str | None | bool = False   # False: not looked at yet
        self._prefill_ws = None
        self._prefill_tokens = 0   # the token count the prefill workspace was sized for

    # -- weights --------------------------------------------------------------------------
    @property
    def experts(self) -> PackedExperts:
        """The packed weights, rebuilt from the module's buffers after ``.to()``/``.cuda()``."""
        ex = self._experts
        if ex.w13.qweight is not self.w13_qweight or ex.w2.scales is not self.w2_scales:
            def weights(prefix: str, g: int) -> PackedWeights:
                return PackedWeights(
                    qweight=getattr(self, f"{prefix}_qweight"),
                    scales=getattr(self, f"{prefix}_scales"),
                    zeros=getattr(self, f"{prefix}_zeros"), perm=getattr(self, f"{prefix}_perm"),
                    group_size=g, name=prefix)

            meta = dict(self._meta, dtype=self.w13_scales.dtype)
            ex = PackedExperts(w13=weights("w13", self._group_sizes[0]),
                               w2=weights("w2", self._group_sizes[1]), **meta)
            self._experts = ex
            self._decode_ws = self._prefill_ws = self._mixed_ws = None
            self._mixed_why = False
        return ex

    @property
    def num_global_experts(self) -> int:
        return self._meta["num_experts"] if self.expert_map is None else self.expert_map.shape[0]

    def _thresholds(self) -> tuple[int, int]:
        """``(decode_threshold, decode_gemm1_threshold)``: the arguments, else the measured
        values (one lookup of the thresholds file for both), else ``DEFAULT_DECODE_THRESHOLD``
        and the decode threshold (no mixed path)."""
        thr, gemm1 = self._threshold_arg, self._gemm1_threshold_arg
        if thr is None or gemm1 is None:
            measured = measured_thresholds(self.experts, self.top_k)
            if thr is None:
                thr = DEFAULT_DECODE_THRESHOLD if measured[0] is None else measured[0]
            if gemm1 is None:
                gemm1 = thr if measured[1] is None else measured[1]
        return thr, gemm1

    @property
    def decode_threshold(self) -> int:
        return self._thresholds()[0]

    @property
    def decode_gemm1_threshold(self) -> int:
        return self._thresholds()[1]

    @property
    def mixed_unsupported(self) -> str | None:
        """Why GEMM1 of this layer cannot run on the mma kernel (the mixed path is then never
        chosen), or None (looked at once per weights)."""
        if self._mixed_why is False:
            from .kernels.mixed import mixed_unsupported

            self._mixed_why = mixed_unsupported(self.experts)
        return self._mixed_why

    def extra_repr(self) -> str:
        m = self._meta
        return (f"num_experts={m['num_experts']}, hidden_size={m['hidden_size']}, "
                f"intermediate_size={m['intermediate_size']}, top_k={self.top_k}, "
                f"group_size={self._group_sizes[0]}, activation={self.activation!r}"
                + (", deterministic=True" if self.deterministic else ""))

    # -- workspaces -----------------------------------------------------------------------
    def reserve(self, max_tokens: int) -> None:
        """Allocate the workspaces for up to ``max_tokens`` tokens now (e.g. before graph
        capture), so later calls with at most that many tokens allocate nothing (deterministic mode:
        the prefill workspace only)."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens is {max_tokens}; expected >= 0")
        if self.deterministic:
            self._workspace(DETERMINISTIC_PATH, max(max_tokens, 1))
            return
        threshold, gemm1_threshold = self._thresholds()
        decode_max = min(max_tokens, max(threshold, 1))
        self._workspace("decode", decode_max)
        if gemm1_threshold < min(max_tokens, threshold) and self.mixed_unsupported is None:
            self._workspace("mixed", decode_max)
        if max_tokens > threshold:
            self._workspace("prefill", max_tokens)

    def _workspace(self, path: str, m: int):
        from .kernels.decode import DecodeWorkspace
        from .kernels.prefill import PrefillWorkspace

        ex = self.experts
        if path in ("decode", "mixed"):
            ws = self._decode_ws
            if ws is None or ws.max_tokens < m:
                ws = self._decode_ws = DecodeWorkspace.create(ex, self.top_k, max(m, 1))
            if path == "decode":
                return ws
            from .kernels.mixed import MixedWorkspace

            mws = self._mixed_ws
            if mws is None or mws.decode is not ws:
                mws = self._mixed_ws = MixedWorkspace.create(
                    ex, self.top_k, ws.max_tokens, num_global_experts=self.num_global_experts,
                    decode=ws)
            return mws
        ws = self._prefill_ws
        # (not the intermediate's rows: room for sorted rows makes them more than the slots)
        if ws is None or self._prefill_tokens < m:
            need = self._config_needs(max(m, 1))
            ws = self._prefill_ws = PrefillWorkspace.allocate(
                max(m, 1), ex, self.top_k, num_global_experts=self.num_global_experts,
                sorted_rows=need.sorted_rows, split_partials=need.split_partials)
            self._prefill_tokens = max(m, 1)
            if need.stream_k_counters:
                # the Gluon kernel's Stream-K scratch, so that a graph captured later does
                # not need to grow it
                from .kernels.prefill_rs import stream_k_scratch

                stream_k_scratch(ex.device, need.stream_k_partials, need.stream_k_counters)
        return ws

    def _config_key(self) -> tuple:
        """What the prefill configs (and so :meth:`_config_needs`) depend on: the layer's
        shape, dtype and device, top-k, the deterministic mode, the global expert count and,
        on a GPU, the version of the tuned table file."""
        ex = self.experts
        table = None
        if ex.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            path = tuned_file(ex.device)
            table = (str(path), path.stat().st_mtime_ns if path.exists() else None)
        return (ex.num_experts, ex.hidden_size, ex.intermediate_size, ex.dtype, ex.device,
                self.top_k, self.deterministic, self.num_global_experts, table)

    def _config_needs(self, m: int) -> _ConfigNeeds:
        """What the prefill configs of every token count up to ``m`` need besides the
        workspace's fixed buffers (:class:`_ConfigNeeds`). Every count is looked at, since a
        smaller call may take a table bucket with sorted rows, a split or Stream-K that
        ``m``'s bucket does not have; each count is scanned once for all the modules of
        the same :meth:`_config_key` (the result covers at least ``m``)."""
        from .kernels import prefill_rs
        from .kernels.prefill import layer_configs
        from .routing import max_num_tokens_padded

        scan = _CONFIG_NEEDS.setdefault(self._config_key(), _ConfigNeeds())
        if m <= scan.tokens:
            return scan
        ex = self.experts
        i, h = ex.intermediate_size, ex.hidden_size
        gluon = ex.device.type == "cuda" and prefill_rs.gluon_unsupported(ex.device) is None
        sms = torch.cuda.get_device_properties(ex.device).multi_processor_count if gluon else 0
        for tokens in range(scan.tokens + 1, m + 1):
            cfgs = layer_configs(ex, self.top_k, tokens, deterministic=self.deterministic)
            em = max_num_tokens_padded(tokens * self.top_k, cfgs[0]["BLOCK_SIZE_M"],
                                       self.num_global_experts)
            if any(c.get("SORTED_ROWS") for c in cfgs):
                scan.sorted_rows = max(scan.sorted_rows, em)
            splits = cfgs[1].get("SPLIT_K", 1)
            if splits > 1:
                scan.split_partials = max(scan.split_partials,
                                          splits * tokens * self.top_k * h)
            for cfg, n_out, k, act in ((cfgs[0], i, h, True), (cfgs[1], h, i, False)):
                if gluon and cfg.get("RS") and cfg.get("STREAM_K"):
                    _, e, u = prefill_rs.stream_k_sizes(cfg, em=em, n_out=n_out, k=k,
                                                        activation=act, sms=sms)
                    scan.stream_k_partials = max(scan.stream_k_partials, e)
                    scan.stream_k_counters = max(scan.stream_k_counters, u)
        scan.tokens = m
        return scan

    # -- forward --------------------------------------------------------------------------
    def choose_path(self, num_tokens: int) -> str:
        """``"decode"``, ``"mixed"`` or ``"prefill"``: what ``forward`` runs for
        ``num_tokens`` (always ``DETERMINISTIC_PATH`` in the deterministic mode): decode up
        to ``decode_gemm1_threshold``, mixed above it up to ``decode_threshold`` (decode where
        :attr:`mixed_unsupported`), prefill above."""
        if self.deterministic:
            return DETERMINISTIC_PATH
        threshold, gemm1_threshold = self._thresholds()
        if num_tokens > threshold:
            return "prefill"
        if num_tokens > gemm1_threshold and self.mixed_unsupported is None:
            return "mixed"
        return "decode"

    def check_hidden_states(self, hidden_states: torch.Tensor) -> None:
        """Raise ValueError unless ``hidden_states`` is an ``[M, H]`` tensor of the experts'
        dtype on their device."""
        if not isinstance(hidden_states, torch.Tensor):
            raise ValueError(f"hidden_states is a {type(hidden_states).__name__}; expected a "
                             "torch.Tensor")
        device = self.w13_qweight.device
        if hidden_states.device != device:
            raise ValueError(f"hidden_states is on {hidden_states.device}; expected {device} "
                             "(the experts' device)")
        h, dtype = self._meta["hidden_size"], self.w13_scales.dtype
        if hidden_states.dim() != 2 or hidden_states.shape[1] != h:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected "
                             f"[M, {h}]")
        if hidden_states.dtype != dtype:
            raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; expected {dtype} "
                             "(the experts' dtype)")

    def check_inputs(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> None:
        """Raise ValueError (naming the tensor, the expected and the found value) unless
        ``hidden_states [M, H]`` (the experts' dtype), ``topk_weights [M, top_k]`` (float)
        and ``topk_ids [M, top_k]`` (int32/int64) fit this layer and are on its device; then,
        when :meth:`checks_values` for their device, that every id is in
        ``[0, num_global_experts)``."""
        self.check_hidden_states(hidden_states)
        for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} is a {type(t).__name__}; expected a torch.Tensor")
            if t.device != hidden_states.device:
                raise ValueError(f"{name} is on {t.device}; expected {hidden_states.device} "
                                 "(the experts' device)")
        m = hidden_states.shape[0]
        if tuple(topk_ids.shape) != (m, self.top_k):
            raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected "
                             f"[{m}, {self.top_k}] (M, top_k)")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; expected torch.int32 or "
                             "torch.int64")
        if tuple(topk_weights.shape) != (m, self.top_k):
            raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}; expected "
                             f"[{m}, {self.top_k}] (M, top_k)")
        if not topk_weights.dtype.is_floating_point:
            raise ValueError(f"topk_weights has dtype {topk_weights.dtype}; expected a "
                             "floating-point dtype")
        if topk_ids.numel() and self.checks_values(topk_ids.device):
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(topk_ids)).tolist())
            num_global = self.num_global_experts
            if lo < 0 or hi >= num_global:
                raise ValueError(f"topk_ids range over [{lo}, {hi}]; expected ids in "
                                 f"[0, {num_global})")

    def checks_values(self, device: torch.device) -> bool:
        """Whether :meth:`check_inputs` reads ``topk_ids`` back to check their range on
        ``device`` (see ``validate``); never during CUDA graph capture."""
        if (device.type == "cuda" and torch.cuda.is_available()
                and torch.cuda.is_current_stream_capturing()):
            return False
        if self.validate is not None:
            return bool(self.validate)
        return device.type == "cpu" or os.environ.get(CHECK_ENV, "") == "1"

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, path: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, H]`` output; ``path`` forces ``"decode"``, ``"mixed"`` (not in the
        deterministic mode) or ``"prefill"``."""
        from .kernels.decode import fused_moe_decode
        from .kernels.mixed import fused_moe_mixed
        from .kernels.prefill import fused_moe_prefill

        self._check_path(path)
        self.check_inputs(hidden_states, topk_weights, topk_ids)
        # no copies for contiguous inputs (the graph-capture case)
        hidden_states = hidden_states.contiguous()
        topk_weights = topk_weights.contiguous()
        topk_ids = topk_ids.contiguous()
        m = hidden_states.shape[0]
        path = path or self.choose_path(m)
        common = dict(activation=self.activation,
                      apply_router_weight_on_input=self.apply_router_weight_on_input,
                      expert_map=self.expert_map, out=out,
                      workspace=self._workspace(path, max(m, 1)))
        if path == "mixed":
            return fused_moe_mixed(hidden_states, self.experts, topk_weights, topk_ids,
                                   **common)
        run = fused_moe_decode if path == "decode" else fused_moe_prefill
        return run(hidden_states, self.experts, topk_weights, topk_ids, **common,
                   deterministic=self.deterministic)

    def _check_path(self, path: str | None) -> None:
        if path is not None and path not in PATHS:
            raise ValueError(f"path is {path!r}; expected one of {PATHS}")
        if path == "mixed" and self.deterministic:
            raise ValueError("path is 'mixed' with deterministic=True; expected 'decode' or "
                             "'prefill' (the mixed path is not batch invariant)")

    def forward_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                       renormalize: bool = True, scoring: str = "softmax",
                       num_expert_group: int | None = None, topk_group: int | None = None,
                       correction_bias: torch.Tensor | None = None,
                       routed_scaling_factor: float = 1.0, path: str | None = None
                       ) -> torch.Tensor:
        """Route with :func:`~w4a16moe.routing.fused_topk` on ``router_logits [M, E]``, then
        :meth:`forward`. On the prefill and mixed paths without grouped top-k the routing and
        the alignment run as one kernel where they can
        (:func:`~w4a16moe.routing.fused_topk_align`; prefill: not in the deterministic
        mode): the same output."""
        self._check_path(path)
        grouped = num_expert_group is not None and num_expert_group > 1
        chosen = None
        if not grouped and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 2:
            chosen = path or self.choose_path(hidden_states.shape[0])
        if chosen in ("prefill", "mixed"):
            from .kernels.prefill import fused_moe_prefill_from_logits

            self.check_hidden_states(hidden_states)
            if (not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2
                    or router_logits.shape[1] != self.num_global_experts):
                found = tuple(getattr(router_logits, "shape", ()))
                raise ValueError(f"router_logits has shape {found}; expected "
                                 f"[M, {self.num_global_experts}] (M, num_global_experts)")
            if router_logits.device != hidden_states.device:
                raise ValueError(f"router_logits is on {router_logits.device}; expected "
                                 f"{hidden_states.device} (the experts' device)")
            m = hidden_states.shape[0]
            if chosen == "mixed":
                return self._mixed_from_logits(
                    hidden_states.contiguous(), router_logits, renormalize=renormalize,
                    scoring=scoring, correction_bias=correction_bias,
                    routed_scaling_factor=routed_scaling_factor)
            return fused_moe_prefill_from_logits(
                hidden_states.contiguous(), self.experts, router_logits, self.top_k,
                renormalize=renormalize, scoring=scoring, correction_bias=correction_bias,
                routed_scaling_factor=routed_scaling_factor, activation=self.activation,
                apply_router_weight_on_input=self.apply_router_weight_on_input,
                expert_map=self.expert_map, workspace=self._workspace("prefill", max(m, 1)),
                deterministic=self.deterministic)
        topk_weights, topk_ids = fused_topk(
            router_logits, self.top_k, renormalize=renormalize, scoring=scoring,
            num_expert_group=num_expert_group, topk_group=topk_group,
            correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor)
        return self.forward(hidden_states, topk_weights, topk_ids, path=path)

    def _mixed_from_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                           **routing) -> torch.Tensor:
        """The mixed path from router logits: one kernel routes and aligns into the mixed
        workspace (:func:`~w4a16moe.routing.fused_topk_align`) where it can, else
        ``fused_topk`` and the layer's own alignment."""
        from .kernels.mixed import MIXED_GEMM1_CONFIG, fused_moe_mixed
        from .kernels.prefill import ROUTE_ALIGN
        from .routing import fused_topk_align, fused_topk_align_supported

        m = hidden_states.shape[0]
        ws = self._workspace("mixed", max(m, 1))
        blocks = None
        if ROUTE_ALIGN and m >= 1 and fused_topk_align_supported(
                m, self.num_global_experts, router_logits.device):
            bm = MIXED_GEMM1_CONFIG["BLOCK_SIZE_M"]
            views = ws.align.views(m * self.top_k, bm, self.num_global_experts)
            weights, ids, blocks = fused_topk_align(
                router_logits, self.top_k, bm, self.expert_map,
                out=views[0] if views is not None else None, **routing)
        else:
            weights, ids = fused_topk(router_logits, self.top_k, **routing)
            self.check_inputs(hidden_states, weights, ids)
        return fused_moe_mixed(hidden_states, self.experts, weights, ids,
                               activation=self.activation,
                               apply_router_weight_on_input=self.apply_router_weight_on_input,
                               expert_map=self.expert_map, workspace=ws, blocks=blocks)
