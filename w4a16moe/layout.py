"""The one packed int4 layout every kernel reads.

``qweight`` int32 ``[E, N, K/8]``: for output row ``n``, eight consecutive reduction (K) values
per word in ExLlama shuffle order::

    v0 | v2<<4 | v4<<8 | v6<<12 | v1<<16 | v3<<20 | v5<<24 | v7<<28

so value ``j`` of a word sits at bit ``(j // 2) * 4 + (j % 2) * 16``.

``scales`` fp16/bf16 ``[E, N, K/G]``; optional ``zeros`` uint8 ``[E, N, K/G]`` holding the
unsigned 4-bit zero point (absent: symmetric, zero point 8); optional ``perm`` int32 ``[E, K]``
for act-order checkpoints: packed column ``k`` multiplies activation ``perm[e, k]``, and the
groups are contiguous in packed order (column ``k`` belongs to group ``k // G``).

Dequantization: ``w[n, perm[k]] = (q[n, k] - z[n, k // G]) * s[n, k // G]``.

w13 (gate and up stacked) has rows ``[0, I)`` gate and ``[I, 2I)`` up; w2 (down) is ``[E, H, I/8]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

PACK_FACTOR = 8
#: bit offset of value j (0..7) inside one int32 word
SHUFFLE_SHIFTS = tuple((j // 2) * 4 + (j % 2) * 16 for j in range(PACK_FACTOR))
SUPPORTED_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16)
FORMAT_VERSION = "1"
#: metadata keys that :func:`save_packed` owns (``extra_metadata`` may not set them)
RESERVED_METADATA_KEYS = ("format", "format_version", "layers")
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _checks_values(*tensors: torch.Tensor | None) -> bool:
    """Whether value checks (which read data back to the host) may run on these tensors:
    not on the ``meta`` device and not while a CUDA graph is being captured."""
    if any(t is not None and t.device.type == "meta" for t in tensors):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[..., N, K]`` (any integer dtype, 0..15) into int32
    ``[..., N, K/8]`` in ExLlama shuffle order (value ``j`` of a word at bit
    ``(j // 2) * 4 + (j % 2) * 16``)."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"values is a {type(values).__name__}; expected a torch.Tensor")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"values has dtype {values.dtype}; expected an integer dtype")
    if values.dim() < 1 or values.shape[-1] % PACK_FACTOR != 0:
        raise ValueError(
            f"values has shape {_shape(values)}; expected the last dimension (K) to be a "
            f"multiple of {PACK_FACTOR}"
        )
    if values.numel() and _checks_values(values):
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 15:
            raise ValueError(f"values range over [{lo}, {hi}]; expected 0..15 (4 bits)")
    words = values.shape[-1] // PACK_FACTOR
    v = values.to(torch.int64).reshape(*values.shape[:-1], words, PACK_FACTOR)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=values.device)
    for j, shift in enumerate(SHUFFLE_SHIFTS):
        word |= v[..., j] << shift
    # reinterpret the unsigned 32-bit word as int32 (two's complement)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[..., N, K/8]`` -> uint8 ``[..., N, K]``."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        found = getattr(qweight, "dtype", type(qweight).__name__)
        raise ValueError(f"qweight has dtype {found}; expected torch.int32")
    if qweight.dim() < 1:
        raise ValueError(f"qweight has shape {_shape(qweight)}; expected at least 1 dim")
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> shift) & 0xF for shift in SHUFFLE_SHIFTS]
    out = torch.stack(parts, dim=-1)
    return out.reshape(*qweight.shape[:-1], qweight.shape[-1] * PACK_FACTOR).to(torch.uint8)


@dataclass(eq=False)
class PackedWeights:
    """One int4 projection for all experts: ``y[e] = x @ W[e].T`` with ``W[e]`` ``[N, K]``.

    Attributes:
        qweight: int32 ``[E, N, K/8]`` (shuffle order, see module docstring).
        scales: fp16/bf16 ``[E, N, K/G]``.
        zeros: optional uint8 ``[E, N, K/G]`` zero points (0..15); None means symmetric (8).
        perm: optional int32 ``[E, K]`` act-order permutation of the activations.
        group_size: G; equal to K for per-channel quantization.
        name: used in error messages (``w13``, ``w2``); not part of the data.

    Construction validates shapes, dtypes and devices, and (except on the ``meta`` device or
    during CUDA graph capture) that ``zeros`` are in 0..15 and each ``perm[e]`` is a
    permutation of ``0..K-1``; every error is a ``ValueError`` naming the tensor.
    Equality is identity (tensors have no single truth value).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    group_size: int = 128
    name: str = field(default="weights", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- shape properties -------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def k(self) -> int:
        return self.qweight.shape[2] * PACK_FACTOR

    @property
    def num_groups(self) -> int:
        return self.k // self.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        total = 0
        for t in (self.qweight, self.scales, self.zeros, self.perm):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def validate(self) -> None:
        n = self.name
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dtype != torch.int32:
            found = getattr(self.qweight, "dtype", type(self.qweight).__name__)
            raise ValueError(f"{n}.qweight has dtype {found}; expected torch.int32")
        if self.qweight.dim() != 3:
            raise ValueError(
                f"{n}.qweight has shape {_shape(self.qweight)}; expected 3 dims [E, N, K/8]"
            )
        e, rows, words = self.qweight.shape
        k = words * PACK_FACTOR
        if k == 0:
            raise ValueError(f"{n}.qweight has shape {_shape(self.qweight)}; expected K/8 >= 1")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
            raise ValueError(f"{n}.group_size is {g!r}; expected a positive int")
        if g != k and g not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"{n}.group_size is {g}; expected one of {SUPPORTED_GROUP_SIZES} or K={k} "
                "(per channel)"
            )
        if k % g != 0:
            raise ValueError(f"{n}: K={k} is not a multiple of group_size {g}")
        expected = (e, rows, k // g)
        if not isinstance(self.scales, torch.Tensor) or self.scales.dtype not in FLOAT_DTYPES:
            found = getattr(self.scales, "dtype", type(self.scales).__name__)
            raise ValueError(f"{n}.scales has dtype {found}; expected float16 or bfloat16")
        if _shape(self.scales) != expected:
            raise ValueError(f"{n}.scales has shape {_shape(self.scales)}; expected {expected}")
        if self.zeros is not None:
            if not isinstance(self.zeros, torch.Tensor) or self.zeros.dtype != torch.uint8:
                found = getattr(self.zeros, "dtype", type(self.zeros).__name__)
                raise ValueError(f"{n}.zeros has dtype {found}; expected torch.uint8")
            if _shape(self.zeros) != expected:
                raise ValueError(f"{n}.zeros has shape {_shape(self.zeros)}; expected {expected}")
        if self.perm is not None:
            if not isinstance(self.perm, torch.Tensor) or self.perm.dtype != torch.int32:
                found = getattr(self.perm, "dtype", type(self.perm).__name__)
                raise ValueError(f"{n}.perm has dtype {found}; expected torch.int32")
            if _shape(self.perm) != (e, k):
                raise ValueError(f"{n}.perm has shape {_shape(self.perm)}; expected {(e, k)}")
        for t_name in ("scales", "zeros", "perm"):
            t = getattr(self, t_name)
            if t is not None and t.device != self.qweight.device:
                raise ValueError(
                    f"{n}.{t_name} is on {t.device}; expected {self.qweight.device} "
                    "(the device of qweight)"
                )
        if not _checks_values(self.qweight):
            return
        if self.zeros is not None and self.zeros.numel():
            zmax = int(self.zeros.max())
            if zmax > 15:
                raise ValueError(f"{n}.zeros has a value {zmax}; expected 0..15 (4 bits)")
        if self.perm is not None and self.perm.numel():
            ident = torch.arange(k, dtype=torch.int32, device=self.perm.device)
            bad = (self.perm.sort(dim=-1).values != ident).any(dim=-1)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{n}.perm[{first}] is not a permutation of 0..{k - 1} (K={k})"
                )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move to ``device`` and/or cast the scales to ``dtype`` (fp16/bf16)."""
        def mv(t):
            return None if t is None else t.to(device) if device is not None else t

        scales = mv(self.scales)
        if dtype is not None:
            scales = scales.to(dtype)
        return replace(self, qweight=mv(self.qweight), scales=scales, zeros=mv(self.zeros),
                       perm=mv(self.perm))

    def contiguous(self) -> PackedWeights:
        def c(t):
            return None if t is None else t.contiguous()

        return replace(self, qweight=c(self.qweight), scales=c(self.scales), zeros=c(self.zeros),
                       perm=c(self.perm))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[E, N, K]`` weights in the activations' (unpermuted) K order:
        ``W[e, n, perm[e, k]] = (q[e, n, k] - z[e, n, k // G]) * s[e, n, k // G]``."""
        if not dtype.is_floating_point:
            raise ValueError(f"dtype is {dtype}; expected a floating-point dtype")
        q = unpack_int4(self.qweight).to(dtype)
        g = self.group_size
        scales = self.scales.to(dtype).repeat_interleave(g, dim=-1)
        if self.zeros is None:
            zeros = 8.0
        else:
            zeros = self.zeros.to(dtype).repeat_interleave(g, dim=-1)
        w = (q - zeros) * scales
        if self.perm is not None:
            out = torch.empty_like(w)
            idx = self.perm.to(torch.int64).unsqueeze(1).expand(-1, w.shape[1], -1)
            out.scatter_(2, idx, w)
            w = out
        return w

    def select_experts(self, index: torch.Tensor | slice) -> PackedWeights:
        """The same projection restricted to some experts (``index`` along dim 0)."""
        def s(t):
            return None if t is None else t[index].contiguous()

        return replace(self, qweight=s(self.qweight), scales=s(self.scales), zeros=s(self.zeros),
                       perm=s(self.perm))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        return out


@dataclass(eq=False)
class PackedExperts:
    """All experts of one MoE layer in the packed layout.

    ``w13``: ``[E, 2*I, H/8]`` (gate rows first, then up); ``w2``: ``[E, H, I/8]``; both with
    scales of ``dtype`` (the activations' dtype) and on one device. Validated on construction
    (``ValueError`` naming the tensor, the expected and the found value). Equality is identity.
    """

    w13: PackedWeights
    w2: PackedWeights
    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("w13", "w2"):
            if not isinstance(getattr(self, name), PackedWeights):
                raise ValueError(f"{name} is a {type(getattr(self, name)).__name__}; "
                                 "expected PackedWeights")
        self.w13.name = "w13"
        self.w2.name = "w2"
        self.validate()

    def validate(self) -> None:
        for attr in ("num_experts", "hidden_size", "intermediate_size"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{attr} is {v!r}; expected a non-negative int")
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        if h <= 0 or i <= 0 or h % PACK_FACTOR or i % PACK_FACTOR:
            raise ValueError(
                f"hidden_size={h} and intermediate_size={i}; expected positive multiples of "
                f"{PACK_FACTOR}"
            )
        self.w13.validate()
        self.w2.validate()
        exp13 = (e, 2 * i, h // PACK_FACTOR)
        exp2 = (e, h, i // PACK_FACTOR)
        if _shape(self.w13.qweight) != exp13:
            raise ValueError(
                f"w13.qweight has shape {_shape(self.w13.qweight)}; expected {exp13} "
                "[E, 2*I, H/8]"
            )
        if _shape(self.w2.qweight) != exp2:
            raise ValueError(
                f"w2.qweight has shape {_shape(self.w2.qweight)}; expected {exp2} [E, H, I/8]"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype is {self.dtype}; expected torch.float16 or torch.bfloat16")
        for p in (self.w13, self.w2):
            if p.scales.dtype != self.dtype:
                raise ValueError(
                    f"{p.name}.scales has dtype {p.scales.dtype}; expected {self.dtype} "
                    "(the experts' dtype)"
                )
        if self.w13.device != self.w2.device:
            raise ValueError(
                f"w2 is on {self.w2.device}; expected {self.w13.device} (the device of w13)"
            )

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return PackedExperts(
            w13=self.w13.to(device, dtype), w2=self.w2.to(device, dtype),
            num_experts=self.num_experts, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, dtype=dtype or self.dtype,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 ``[E, 2I, H]``, w2 ``[E, H, I]``) as float tensors."""
        return self.w13.dequantize(dtype), self.w2.dequantize(dtype)

    def select_experts(self, index: torch.Tensor | slice) -> PackedExperts:
        w13 = self.w13.select_experts(index)
        return PackedExperts(w13=w13, w2=self.w2.select_experts(index),
                             num_experts=w13.num_experts, hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size, dtype=self.dtype)

    # -- our own file format ----------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = self.w13.tensors(f"{prefix}w13")
        out.update(self.w2.tensors(f"{prefix}w2"))
        return out

    def metadata(self) -> dict[str, object]:
        return {
            "num_experts": self.num_experts, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "w13_group_size": self.w13.group_size, "w2_group_size": self.w2.group_size,
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, object],
                        prefix: str = "") -> PackedExperts:
        def weights(name: str) -> PackedWeights:
            key = f"{prefix}{name}"
            for part in ("qweight", "scales"):
                if f"{key}.{part}" not in tensors:
                    raise ValueError(f"missing tensor {key}.{part}")
            return PackedWeights(
                qweight=tensors[f"{key}.qweight"], scales=tensors[f"{key}.scales"],
                zeros=tensors.get(f"{key}.zeros"), perm=tensors.get(f"{key}.perm"),
                group_size=int(meta[f"{name}_group_size"]), name=name,
            )

        try:
            dtype_name = str(meta["dtype"])
            if dtype_name not in _DTYPE_NAMES:
                raise ValueError(f"packed experts metadata has dtype {dtype_name!r}; expected "
                                 f"one of {tuple(_DTYPE_NAMES)}")
            dtype = _DTYPE_NAMES[dtype_name]
            return cls(w13=weights("w13"), w2=weights("w2"), num_experts=int(meta["num_experts"]),
                       hidden_size=int(meta["hidden_size"]),
                       intermediate_size=int(meta["intermediate_size"]), dtype=dtype)
        except KeyError as exc:
            raise ValueError(f"packed experts metadata lacks {exc.args[0]!r}") from None


def _tensor_names(prefix: str, experts: PackedExperts) -> list[str]:
    return list(experts.state_dict(prefix))


def save_packed(path: str | os.PathLike, layers: dict[int, PackedExperts],
                extra_metadata: dict[str, str] | None = None) -> None:
    """Write MoE layers (layer index -> experts) to one safetensors file with metadata.

    Tensors are named ``layers.{idx}.w13.qweight`` (``.scales``, ``.zeros``, ``.perm``) and
    likewise for ``w2``; the file metadata holds ``format="w4a16moe"``, ``format_version``
    and ``layers`` (JSON: per layer sizes, dtype, group sizes) plus ``extra_metadata``
    (str -> str; may not use the keys in ``RESERVED_METADATA_KEYS``). Tensors may live on any
    device, be non-contiguous, or share memory (the same experts saved under two indices).
    Written to a temporary name in the same folder and renamed, so an interrupted save leaves
    no file behind (and an existing file at ``path`` untouched).
    """
    from safetensors.torch import save_file

    if not isinstance(layers, dict):
        raise ValueError(f"layers is a {type(layers).__name__}; expected a dict "
                         "{layer index: PackedExperts}")
    for idx, experts in layers.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"layers has key {idx!r}; expected a non-negative int layer index")
        if not isinstance(experts, PackedExperts):
            raise ValueError(f"layers[{idx}] is a {type(experts).__name__}; "
                             "expected PackedExperts")
    extra = dict(extra_metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra_metadata has {key!r}: {value!r}; expected str -> str")
        if key in RESERVED_METADATA_KEYS:
            raise ValueError(f"extra_metadata sets {key!r}; the keys {RESERVED_METADATA_KEYS} "
                             "belong to the file format")

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    layer_meta: dict[str, object] = {}
    for idx, experts in sorted(layers.items()):
        for name, t in experts.state_dict(f"layers.{idx}.").items():
            t = t.detach().to("cpu").contiguous()
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in seen_storage and t.numel():
                t = t.clone()  # safetensors refuses tensors that share memory
            seen_storage.add(key)
            tensors[name] = t
        layer_meta[str(idx)] = experts.metadata()
    meta = {"format": "w4a16moe", "format_version": FORMAT_VERSION,
            "layers": json.dumps(layer_meta)}
    meta.update(extra)
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_metadata(f: Any, path: str) -> dict[str, str]:
    meta = f.metadata() or {}
    if meta.get("format") != "w4a16moe":
        raise ValueError(
            f"{path} is not a w4a16moe packed file (metadata format={meta.get('format')!r}; "
            "expected 'w4a16moe')"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; this "
                         f"version of w4a16moe reads {FORMAT_VERSION!r}")
    return dict(meta)


def packed_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a file written by :func:`save_packed` (format keys and
    ``extra_metadata``), without reading tensors. ``ValueError`` for other files."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return _read_metadata(f, path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"cannot read packed experts from {path}: {exc}") from exc


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu"
                ) -> dict[int, PackedExperts]:
    """Read a file written by :func:`save_packed` onto ``device``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` naming the file
    if it is truncated or corrupt, not a w4a16moe file, or holds inconsistent tensors.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = _read_metadata(f, path)
            layer_meta = json.loads(meta["layers"])
            if not isinstance(layer_meta, dict):
                raise ValueError("metadata 'layers' is not a JSON object")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        out: dict[int, PackedExperts] = {}
        used: set[str] = set()
        for idx, m in layer_meta.items():
            prefix = f"layers.{int(idx)}."
            out[int(idx)] = experts = PackedExperts.from_state_dict(tensors, m, prefix=prefix)
            used.update(_tensor_names(prefix, experts))
        unknown = sorted(set(tensors) - used)
        if unknown:
            raise ValueError(f"tensors {unknown[:5]} belong to no layer in the metadata")
        return out
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        if isinstance(exc, ValueError) and path in str(exc):
            raise
        raise ValueError(f"cannot read packed experts from {path}: {exc}") from exc
