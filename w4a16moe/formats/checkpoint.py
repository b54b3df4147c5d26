"""Load the experts of a quantized Hugging Face MoE checkpoint into :class:`PackedExperts`.

A checkpoint directory holds ``config.json`` (``model_type``, sizes, ``quantization_config``)
and either ``model.safetensors``, shards listed in ``model.safetensors.index.json``, or other
``*.safetensors`` files. Only expert tensors are read, lazily, one layer at a time, so a
subset of layers (pipeline stages) or of experts (expert parallelism) costs only its share.

Which modules are experts is the family's business (:mod:`.families`); how a module is stored
is the format's (:mod:`.gptq`, :mod:`.awq`, :mod:`.compressed_tensors`). A module is
quantized when its primary tensor (``qweight`` / ``weight_packed``) is present and
unquantized when only ``weight`` is; unquantized experts are quantized here (round to
nearest, :func:`~w4a16moe.quantize.quantize_weights`) when asked, and otherwise reported in
:class:`ConversionReport` with the reason (e.g. a GPTQ ``dynamic`` ``-:`` rule or a
compressed-tensors ``ignore`` entry) and left out.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType

import torch

from ..layout import FLOAT_DTYPES, PackedExperts, PackedWeights, save_packed, unpack_int4
from ..quantize import quantize_weights
from . import awq, compressed_tensors, gptq
from .common import (
    DecodedProjection,
    concat_experts,
    expect_shape,
    pack_projections,
    pack_sequential,
)
from .families import PROJECTIONS, Family, family_for
from .quant_config import QuantConfig, WeightScheme, read_quant_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FORMAT_MODULES: dict[str, ModuleType] = {
    "gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors,
}
_SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64,
}


# --------------------------------------------------------------------------------------------
# tensors on disk
# --------------------------------------------------------------------------------------------
class TensorStore:
    """Lazy, read-only access to the tensors of a checkpoint directory.

    Files are opened on first use and kept open until :meth:`close`. Errors of the
    safetensors library (truncated or corrupt files) become ``ValueError`` naming the file.
    """

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}
        self._file_of: dict[str, str] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"{index} is not a safetensors index: {exc}") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            for file in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(path, file)):
                    raise ValueError(f"{index} lists shard {file}, which is not in {path}")
            self._file_of = dict(weight_map)
            return
        if os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path} holds no {SINGLE_FILE}, {INDEX_FILE} or other "
                             "*.safetensors file")
        for file in files:
            for name in self._open(file).keys():
                self._file_of[name] = file

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def _open(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            full = os.path.join(self.path, file)
            try:
                self._handles[file] = safe_open(full, framework="pt", device="cpu")
            except Exception as exc:  # SafetensorError, OSError
                raise ValueError(f"cannot read safetensors file {full}: {exc}") from exc
        return self._handles[file]

    def _guard(self, name: str, fn):
        file = self._file_of[name]
        handle = self._open(file)
        try:
            return fn(handle)
        except Exception as exc:
            raise ValueError(f"cannot read tensor {name} from {os.path.join(self.path, file)}: "
                             f"{exc}") from exc

    def get(self, name: str) -> torch.Tensor:
        return self._guard(name, lambda f: f.get_tensor(name))

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        return self._guard(name, lambda f: f.get_slice(name)[index])

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """(shape, dtype) from the file header, without reading data."""
        def read(f):
            s = f.get_slice(name)
            return tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype())

        return self._guard(name, read)

    def close(self) -> None:
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
@dataclass
class SkippedModule:
    """A module the converter did not turn into packed experts, and why."""

    module: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` / :func:`read_checkpoint` did.

    Attributes:
        checkpoint: the source directory.
        family: ``model_type`` of the model.
        source_format: ``gptq``, ``gptq_v2``, ``awq-gemm``, ``compressed-tensors/...`` or
            ``unquantized``.
        num_experts / hidden_size / intermediate_size: E, H, I of the model.
        experts: the expert indices loaded (None: all).
        layers: MoE layer index -> ``{"w13_group_size", "w2_group_size", "act_order",
            "zeros", "bytes"}`` for each converted layer.
        dtype: dtype of the scales (and activations).
        bytes_in: bytes of checkpoint expert tensors read; bytes_out: bytes packed.
        skipped: expert modules not converted (unquantized, excluded) with the reason.
        not_experts: modules that look like experts but are not routed experts (shared
            experts, dense MLP layers, layers past ``num_hidden_layers``), left alone.
        quantized_here: expert modules stored unquantized that were quantized here (RTN).
        out_file: the packed file written, if any.
    """

    checkpoint: str
    family: str
    source_format: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    experts: list[int] | None = None
    layers: dict[int, dict[str, object]] = field(default_factory=dict)
    dtype: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    skipped: list[SkippedModule] = field(default_factory=list)
    not_experts: list[SkippedModule] = field(default_factory=list)
    quantized_here: list[str] = field(default_factory=list)
    out_file: str | None = None

    def group_sizes(self) -> list[int]:
        """Distinct group sizes over the converted layers (w13 and w2)."""
        sizes = set()
        for info in self.layers.values():
            sizes.add(int(info["w13_group_size"]))
            sizes.add(int(info["w2_group_size"]))
        return sorted(sizes)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        return d


# --------------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------------
@dataclass
class _Module:
    """Where one expert projection is stored."""

    name: str  # module name
    kind: str  # "quantized" | "unquantized" | "fused"
    tensors: dict[str, str]  # suffix -> tensor name (fused: "weight" -> stacked tensor)
    scheme: WeightScheme | None = None
    reason: str = ""


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(name, name)
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"dtype is {dtype!r}; expected float16 or bfloat16")
    return getattr(torch, name)


class Checkpoint:
    """An opened checkpoint directory: config, family, quantization settings, tensor names.

    ``Checkpoint(path).load_layer(L)`` returns the packed experts of MoE layer ``L``.
    Use as a context manager (or call :meth:`close`) to release the open files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"checkpoint {self.path} is not a directory")
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"checkpoint {self.path} has no config.json")
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                self.config = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{cfg_path} holds a {type(self.config).__name__}; expected an "
                             "object")
        self.family: Family = family_for(self.config)
        self.quant: QuantConfig | None = read_quant_config(self.path)
        self.format = None if self.quant is None else _FORMAT_MODULES[self.quant.method]
        self.num_experts = self.family.num_experts(self.config)
        self.hidden_size = self.family.hidden_size(self.config)
        self.intermediate_size = self.family.intermediate_size(self.config)
        self.num_layers = int(self.config.get("num_hidden_layers", 0))
        self.moe_layers = self.family.moe_layers(self.config)
        self.store = TensorStore(self.path)
        self._dtype: torch.dtype | None = None
        self._scan()

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def source_format(self) -> str:
        return "unquantized" if self.quant is None else self.quant.format_name

    # -- discovering names -------------------------------------------------------------------
    def _scan(self) -> None:
        fam = self.family
        expert_re = fam.expert_regex()
        container_re = fam.experts_container_regex()
        names = {n: PROJECTIONS[i] for i, n in enumerate(fam.names)}
        shared_re = None
        if fam.shared:
            alts = "|".join(re.escape(s) for s in fam.shared)
            shared_re = re.compile(rf"^model\.layers\.(\d+)\.({alts})\.")
        fused_re = None
        if fam.fused:
            alts = "|".join(re.escape(f.rsplit(".", 1)[0]) for f in fam.fused)
            fused_re = re.compile(rf"^model\.layers\.(\d+)\.({alts})\.(\w+)$")
        # layer -> expert -> projection -> suffix -> tensor name
        self.entries: dict[int, dict[int, dict[str, dict[str, str]]]] = {}
        self.unrecognized: dict[int, list[str]] = {}
        self.fused: dict[int, dict[str, dict[str, str]]] = {}
        shared: dict[str, set[int]] = {}
        for name in self.store.names():
            m = expert_re.match(name)
            if m:
                layer, expert = int(m.group(1)), int(m.group(2))
                proj = names[m.group(3)]
                slot = self.entries.setdefault(layer, {}).setdefault(expert, {})
                slot.setdefault(proj, {})[m.group(4)] = name
                continue
            if fused_re is not None:
                m = fused_re.match(name)
                if m:
                    self.fused.setdefault(int(m.group(1)), {}).setdefault(
                        m.group(2), {})[m.group(3)] = name
                    continue
            m = container_re.match(name)
            if m:
                self.unrecognized.setdefault(int(m.group(1)), []).append(name)
                continue
            if shared_re is not None:
                m = shared_re.match(name)
                if m:
                    shared.setdefault(f"model.layers.{m.group(1)}.{m.group(2)}", set())
        self.not_experts: list[SkippedModule] = [
            SkippedModule(mod, "shared expert (always active, not routed): left as is")
            for mod in sorted(shared, key=_natural_key)]
        moe = set(self.moe_layers)
        found = set(self.entries) | set(self.fused) | set(self.unrecognized)
        for layer in sorted(found):
            if self.num_layers and layer >= self.num_layers:
                self.not_experts.append(SkippedModule(
                    f"model.layers.{layer}",
                    f"layer index >= num_hidden_layers={self.num_layers} (e.g. a "
                    "multi-token-prediction layer): not converted"))
            elif layer not in moe:
                example = self._example_name(layer)
                raise ValueError(
                    f"{example}: layer {layer} holds expert tensors but config.json makes it a "
                    f"dense layer ({self.family.model_type} MoE layers: "
                    f"{_ranges(self.moe_layers)})")
        for layer in sorted(set(range(self.num_layers)) - moe):
            self.not_experts.append(SkippedModule(f"model.layers.{layer}",
                                                  "dense MLP layer per config.json"))
        for layer, experts in self.entries.items():
            extra = sorted(e for e in experts if e >= self.num_experts)
            if extra:
                e = extra[0]
                proj = next(iter(experts[e].values()))
                raise ValueError(
                    f"{next(iter(proj.values()))}: checkpoint holds expert {e} of layer {layer} "
                    f"but config.json has {self.num_experts} experts "
                    f"({' / '.join(self.family.experts_keys)})")

    def _example_name(self, layer: int) -> str:
        for src in (self.entries, self.fused):
            if layer in src:
                d = src[layer]
                while isinstance(d, dict):
                    d = next(iter(d.values()))
                return str(d)
        return self.unrecognized[layer][0]

    # -- planning a layer --------------------------------------------------------------------
    def _plan_module(self, layer: int, expert: int, proj: str) -> _Module:
        module = self.family.module(layer, expert, proj)
        found = self.entries.get(layer, {}).get(expert, {}).get(proj, {})
        if "bias" in found:
            raise ValueError(f"{module}.bias: the expert has a bias, which the packed layout "
                             "does not hold")
        if self.quant is not None and self.format.PRIMARY in found:
            scheme, reason = self.quant.scheme_for(module)
            if scheme is None:
                raise ValueError(f"{module}.{self.format.PRIMARY} is stored quantized, but the "
                                 f"quantization config says the module is not ({reason})")
            if scheme.bits != 4:
                raise ValueError(f"{module}: quantized with bits={scheme.bits} per "
                                 f"{self.quant.source}; only 4-bit weights convert")
            required, optional = self.format.tensor_suffixes(scheme)
            missing = [s for s in required if s not in found]
            if missing:
                raise ValueError(f"missing expert tensor {module}.{missing[0]} (the module has "
                                 f"{sorted(found)}; {self.quant.format_name} needs "
                                 f"{list(required)})")
            tensors = {s: found[s] for s in required + optional if s in found}
            return _Module(module, "quantized", tensors, scheme)
        if "weight" in found:
            return _Module(module, "unquantized", {"weight": found["weight"]},
                           reason=self._unquantized_reason(module))
        if self.family.fused and layer in self.fused:
            which = self.family.fused[1 if proj == "down" else 0].rsplit(".", 1)[0]
            parts = self.fused[layer].get(which, {})
            if "weight" in parts:
                return _Module(module, "fused", {"weight": parts["weight"]},
                               reason=self._unquantized_reason(module) + " (stored fused as "
                               f"model.layers.{layer}.block_sparse_moe.input_linear / "
                               "output_linear)")
            if parts:
                raise ValueError(f"model.layers.{layer}.{which} is stored as {sorted(parts)}; "
                                 "only an unquantized fused weight is read (quantized Granite-"
                                 "MoE checkpoints name experts block_sparse_moe.experts.{e}.w1)")
        if layer in self.unrecognized and not self.entries.get(layer):
            raise ValueError(
                f"layer {layer} stores its experts as {self.unrecognized[layer][:3]}, not as "
                f"per-expert modules ({self.family.expert_module}.*); that layout is not "
                "supported")
        primary = self.format.PRIMARY if self.format is not None else "weight"
        have = f" (it has {sorted(found)})" if found else ""
        raise ValueError(f"missing expert tensor {module}.{primary}{have}")

    def _unquantized_reason(self, module: str) -> str:
        if self.quant is None:
            return "unquantized: the checkpoint has no quantization config"
        scheme, reason = self.quant.scheme_for(module)
        if scheme is None:
            return f"unquantized: {reason}"
        return "stored unquantized (plain weight) although the quantization config covers it"

    def _resolve_dtype(self, dtype: torch.dtype | None, plans: list[_Module]) -> torch.dtype:
        if dtype is not None:
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"dtype is {dtype}; expected torch.float16 or torch.bfloat16")
            return dtype
        if self._dtype is None:
            for p in plans:
                if p.kind == "quantized":
                    scale = next(s for s in ("scales", "weight_scale") if s in p.tensors)
                    _, d = self.store.info(p.tensors[scale])
                    if d in FLOAT_DTYPES:
                        self._dtype = d
                        break
            if self._dtype is None:
                name = str(self.config.get("torch_dtype") or self.config.get("dtype") or "")
                self._dtype = {"float16": torch.float16}.get(name, torch.bfloat16)
        return self._dtype

    # -- loading -----------------------------------------------------------------------------
    def load_layer(self, layer: int, experts: Sequence[int] | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                   quantize_unquantized: bool = False,
                   report: ConversionReport | None = None) -> PackedExperts | None:
        """The packed experts of MoE layer ``layer`` (``experts``: indices to load, in that
        order; default all), or None when its experts are stored unquantized and
        ``quantize_unquantized`` is false (the modules go to ``report.skipped``)."""
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not a MoE layer of this {self.family.model_type} "
                             f"checkpoint (MoE layers: {_ranges(self.moe_layers)})")
        ids = self._expert_ids(experts)
        dtype = _parse_dtype(dtype)
        plans = {(e, p): self._plan_module(layer, e, p) for e in ids for p in PROJECTIONS}
        unq = [m for m in plans.values() if m.kind != "quantized"]
        if unq and not quantize_unquantized:
            if report is not None:
                report.skipped.extend(_summarize_skipped(unq, len(plans), self.family, layer))
            return None
        dtype = self._resolve_dtype(dtype, list(plans.values()))
        # gate and up are stacked into one projection: one scheme for both
        stacked = {"gate": ("gate", "up"), "up": ("gate", "up"), "down": ("down",)}
        rtn = {p: self._rtn_scheme([m for (_, q), m in plans.items() if q in stacked[p]])
               for p in PROJECTIONS}
        h, i = self.hidden_size, self.intermediate_size
        shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        w13s, w2s = [], []
        bytes_in = 0
        for e in ids:
            dec = {}
            for p in PROJECTIONS:
                mod = plans[(e, p)]
                n, k = shapes[p]
                dec[p], nbytes = self._decode(mod, e, p, n, k, rtn[p], device, dtype)
                bytes_in += nbytes
            w13s.append(pack_projections([dec["gate"], dec["up"]], "w13").to(dtype=dtype))
            w2s.append(pack_projections([dec["down"]], "w2").to(dtype=dtype))
        w13 = concat_experts(w13s, "w13", ids)
        w2 = concat_experts(w2s, "w2", ids)
        out = PackedExperts(w13=w13, w2=w2, num_experts=len(ids), hidden_size=h,
                            intermediate_size=i, dtype=dtype)
        if report is not None:
            report.layers[layer] = {
                "w13_group_size": w13.group_size, "w2_group_size": w2.group_size,
                "act_order": w13.perm is not None or w2.perm is not None,
                "zeros": w13.zeros is not None or w2.zeros is not None,
                "bytes": out.nbytes,
            }
            report.bytes_in += bytes_in
            report.bytes_out += out.nbytes
            report.quantized_here.extend(m.name for m in unq)
        return out

    def _expert_ids(self, experts: Sequence[int] | None) -> list[int]:
        if experts is None:
            return list(range(self.num_experts))
        ids = [int(e) for e in experts]
        if not ids:
            raise ValueError("experts is empty; expected at least one expert index")
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"experts has {bad[0]}; expected indices in 0..{self.num_experts - 1}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"experts {ids} has duplicates")
        return ids

    def _rtn_scheme(self, mods: list[_Module]) -> WeightScheme:
        """Scheme for quantizing unquantized experts of one projection: that of the quantized
        experts of the same projection, else the config default, else G=128 symmetric."""
        for m in mods:
            if m.scheme is not None:
                return m.scheme
        if self.quant is not None:
            return self.quant.default
        return WeightScheme(bits=4, group_size=128, symmetric=True)

    def _decode(self, mod: _Module, expert: int, proj: str, n: int, k: int,
                rtn: WeightScheme, device, dtype: torch.dtype
                ) -> tuple[DecodedProjection, int]:
        if mod.kind == "quantized":
            tensors = {s: self.store.get(t).to(device) for s, t in mod.tensors.items()}
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            fmt_kw = {}
            if self.quant.method == "gptq":
                fmt_kw["checkpoint_format"] = self.quant.checkpoint_format
            return self.format.decode(tensors, n, k, mod.scheme, mod.name, **fmt_kw), nbytes
        if mod.kind == "unquantized":
            w = self.store.get(mod.tensors["weight"])
            expect_shape(w, (n, k), f"{mod.name}.weight")
        else:  # fused [E, 2I, H] (gate rows then up) or [E, H, I]
            stacked = mod.tensors["weight"]
            shape, _ = self.store.info(stacked)
            want = (self.num_experts, 2 * n, k) if proj != "down" else (self.num_experts, n, k)
            if shape != want:
                raise ValueError(f"{stacked} has shape {shape}; expected {want}")
            w = self.store.get_rows(stacked, expert)
            if proj == "gate":
                w = w[:n]
            elif proj == "up":
                w = w[n:]
        if not w.dtype.is_floating_point:
            raise ValueError(f"{mod.name}.weight has dtype {w.dtype}; expected a float dtype")
        nbytes = w.numel() * w.element_size()
        g = rtn.group_size
        pw: PackedWeights = quantize_weights(w.to(device).unsqueeze(0), group_size=g,
                                             symmetric=rtn.symmetric, scale_dtype=dtype,
                                             name=mod.name)
        dec = DecodedProjection(words=pack_sequential(unpack_int4(pw.qweight)[0]),
                                scales=pw.scales[0],
                                zeros=None if pw.zeros is None else pw.zeros[0].to(torch.int32),
                                g_idx=None, group_size=pw.group_size, name=mod.name)
        return dec, nbytes


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _ranges(values: Sequence[int]) -> str:
    vals = sorted(values)
    if not vals:
        return "none"
    out, start, prev = [], vals[0], vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def _summarize_skipped(mods: list[_Module], total: int, family: Family,
                       layer: int) -> list[SkippedModule]:
    """One entry per reason; all modules of a layer with one reason collapse to a wildcard."""
    by_reason: dict[str, list[str]] = {}
    for m in mods:
        by_reason.setdefault(m.reason, []).append(m.name)
    if len(by_reason) == 1 and len(mods) == total:
        reason = next(iter(by_reason))
        container = family.expert_module.format(layer=layer, expert="*")
        return [SkippedModule(f"{container}.*", reason)]
    return [SkippedModule(name, reason) for reason, names in by_reason.items() for name in names]


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def _layer_list(ckpt: Checkpoint, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(ckpt.moe_layers)
    out = [int(x) for x in layers]
    bad = [x for x in out if x not in ckpt.moe_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is not a MoE layer of this {ckpt.family.model_type} "
                         f"checkpoint (MoE layers: {_ranges(ckpt.moe_layers)})")
    return out


def _progress(enabled: bool, total: int, what: str):
    """A rich progress bar over layers, or a no-op stand-in."""
    if not enabled:
        class _Null:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

            def advance(self, *a, **k):
                return None

        return _Null()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Bar:
        def __enter__(self):
            self.p = Progress(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                              transient=False)
            self.p.__enter__()
            self.task = self.p.add_task(what, total=total)
            return self

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

        def advance(self, description: str | None = None):
            self.p.update(self.task, advance=1, description=description or what)

    return _Bar()


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, layers: Sequence[int] | None = None,
                    progress: bool = False, experts: Sequence[int] | None = None,
                    quantize_unquantized: bool = False
                    ) -> tuple[dict[int, PackedExperts], ConversionReport]:
    """Like :func:`load_checkpoint`, also returning the :class:`ConversionReport`."""
    with Checkpoint(path) as ckpt:
        todo = _layer_list(ckpt, layers)
        ids = ckpt._expert_ids(experts)
        report = ConversionReport(
            checkpoint=ckpt.path, family=ckpt.family.model_type,
            source_format=ckpt.source_format, num_experts=ckpt.num_experts,
            hidden_size=ckpt.hidden_size, intermediate_size=ckpt.intermediate_size,
            experts=None if experts is None else ids, not_experts=list(ckpt.not_experts))
        out: dict[int, PackedExperts] = {}
        with _progress(progress, len(todo), "converting MoE layers") as bar:
            for layer in todo:
                pe = ckpt.load_layer(layer, experts=experts, device=device, dtype=dtype,
                                     quantize_unquantized=quantize_unquantized, report=report)
                if pe is not None:
                    out[layer] = pe
                    report.dtype = str(pe.dtype).removeprefix("torch.")
                bar.advance(f"layer {layer}")
    return out, report


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, layers: Sequence[int] | None = None,
                    progress: bool = False, experts: Sequence[int] | None = None,
                    quantize_unquantized: bool = False) -> dict[int, PackedExperts]:
    """Packed experts of a GPTQ / AWQ / compressed-tensors MoE checkpoint directory.

    Args:
        path: directory with ``config.json`` and safetensors file(s).
        device: where the packed tensors go (conversion runs there too).
        dtype: scale dtype (fp16 / bf16); default: the checkpoint's scale dtype (fp32 scales
            and unquantized models: ``torch_dtype`` if fp16, else bf16).
        layers: MoE layer indices to load (default: all MoE layers).
        progress: show a progress bar over layers.
        experts: expert indices to load, in this order (default: all); the packed experts are
            renumbered ``0..len(experts)-1``.
        quantize_unquantized: quantize experts stored unquantized (RTN, the config's group
            size and symmetry, or G=128 symmetric) instead of leaving their layer out.

    Returns:
        ``{MoE layer index: PackedExperts}``. Layers left out are named in a warning (see
        :func:`read_checkpoint` for the full report).
    """
    out, report = read_checkpoint(path, device=device, dtype=dtype, layers=layers,
                                  progress=progress, experts=experts,
                                  quantize_unquantized=quantize_unquantized)
    if report.skipped:
        names = "; ".join(f"{s.module}: {s.reason}" for s in report.skipped[:4])
        more = f" (+{len(report.skipped) - 4} more)" if len(report.skipped) > 4 else ""
        warnings.warn(f"{path}: expert modules not loaded: {names}{more}; pass "
                      "quantize_unquantized=True to quantize them", stacklevel=2)
    return out


def convert_checkpoint(path: str | os.PathLike, out_file: str | os.PathLike,
                       progress: bool = True, device: str | torch.device = "cpu",
                       dtype: torch.dtype | str | None = None,
                       layers: Sequence[int] | None = None,
                       experts: Sequence[int] | None = None,
                       quantize_unquantized: bool = False) -> ConversionReport:
    """Convert a checkpoint's experts and write them with :func:`~w4a16moe.layout.save_packed`
    (metadata: ``source_format``, ``family``, ``group_size``, ``source_checkpoint``,
    ``skipped``). Arguments as :func:`load_checkpoint`. ``ValueError`` when no layer could
    be converted."""
    out, report = read_checkpoint(path, device=device, dtype=dtype, layers=layers,
                                  progress=progress, experts=experts,
                                  quantize_unquantized=quantize_unquantized)
    if not out:
        why = "; ".join(f"{s.module}: {s.reason}" for s in report.skipped[:3]) or "no MoE layers"
        raise ValueError(f"{report.checkpoint}: no MoE layer converted ({why}); pass "
                         "quantize_unquantized=True to quantize unquantized experts")
    sizes = report.group_sizes()
    meta = {
        "source_format": report.source_format,
        "family": report.family,
        "group_size": str(sizes[0]) if len(sizes) == 1 else json.dumps(sizes),
        "source_checkpoint": os.path.abspath(report.checkpoint),
        "skipped": json.dumps([asdict(s) for s in report.skipped]),
    }
    if report.experts is not None:
        meta["experts"] = json.dumps(report.experts)
    save_packed(out_file, out, extra_metadata=meta)
    report.out_file = os.fspath(out_file)
    return report
