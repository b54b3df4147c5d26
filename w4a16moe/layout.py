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

import torch

PACK_FACTOR = 8
#: bit offset of value j (0..7) inside one int32 word
SHUFFLE_SHIFTS = tuple((j // 2) * 4 + (j % 2) * 16 for j in range(PACK_FACTOR))
SUPPORTED_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16)
FORMAT_VERSION = "1"


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[..., N, K]`` (any integer dtype, 0..15) into int32
    ``[..., N, K/8]`` in ExLlama shuffle order."""
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(f"values has dtype {values.dtype}; expected an integer dtype")
    if values.dim() < 1 or values.shape[-1] % PACK_FACTOR != 0:
        raise ValueError(
            f"values has shape {_shape(values)}; expected the last dimension (K) to be a "
            f"multiple of {PACK_FACTOR}"
        )
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError(
            f"values range over [{int(values.min())}, {int(values.max())}]; expected 0..15"
        )
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, PACK_FACTOR)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=values.device)
    for j, shift in enumerate(SHUFFLE_SHIFTS):
        word |= v[..., j] << shift
    # reinterpret the unsigned 32-bit word as int32
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[..., N, K/8]`` -> uint8 ``[..., N, K]``."""
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight has dtype {qweight.dtype}; expected torch.int32")
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> shift) & 0xF for shift in SHUFFLE_SHIFTS]
    out = torch.stack(parts, dim=-1)
    return out.reshape(*qweight.shape[:-1], qweight.shape[-1] * PACK_FACTOR).to(torch.uint8)


@dataclass
class PackedWeights:
    """One int4 projection for all experts: ``y[e] = x @ W[e].T`` with ``W[e]`` ``[N, K]``.

    Attributes:
        qweight: int32 ``[E, N, K/8]`` (shuffle order, see module docstring).
        scales: fp16/bf16 ``[E, N, K/G]``.
        zeros: optional uint8 ``[E, N, K/G]`` zero points (0..15); None means symmetric (8).
        perm: optional int32 ``[E, K]`` act-order permutation of the activations.
        group_size: G; equal to K for per-channel quantization.
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
        g = self.group_size
        if not isinstance(g, int) or g <= 0:
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
            if self.zeros.dtype != torch.uint8:
                raise ValueError(f"{n}.zeros has dtype {self.zeros.dtype}; expected torch.uint8")
            if _shape(self.zeros) != expected:
                raise ValueError(f"{n}.zeros has shape {_shape(self.zeros)}; expected {expected}")
        if self.perm is not None:
            if self.perm.dtype != torch.int32:
                raise ValueError(f"{n}.perm has dtype {self.perm.dtype}; expected torch.int32")
            if _shape(self.perm) != (e, k):
                raise ValueError(f"{n}.perm has shape {_shape(self.perm)}; expected {(e, k)}")
        for t_name in ("scales", "zeros", "perm"):
            t = getattr(self, t_name)
            if t is not None and t.device != self.qweight.device:
                raise ValueError(
                    f"{n}.{t_name} is on {t.device}; expected {self.qweight.device} "
                    "(the device of qweight)"
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
        """Float ``[E, N, K]`` weights in the activations' (unpermuted) K order."""
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


@dataclass
class PackedExperts:
    """All experts of one MoE layer in the packed layout.

    ``w13``: ``[E, 2*I, H/8]`` (gate rows first, then up); ``w2``: ``[E, H, I/8]``.
    """

    w13: PackedWeights
    w2: PackedWeights
    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        self.w13.name = "w13"
        self.w2.name = "w2"
        self.validate()

    def validate(self) -> None:
        self.w13.validate()
        self.w2.validate()
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        exp13 = (e, 2 * i, h // PACK_FACTOR)
        exp2 = (e, h, i // PACK_FACTOR)
        if h % PACK_FACTOR or i % PACK_FACTOR:
            raise ValueError(
                f"hidden_size={h} and intermediate_size={i} must be multiples of {PACK_FACTOR}"
            )
        if _shape(self.w13.qweight) != exp13:
            raise ValueError(
                f"w13.qweight has shape {_shape(self.w13.qweight)}; expected {exp13}"
            )
        if _shape(self.w2.qweight) != exp2:
            raise ValueError(f"w2.qweight has shape {_shape(self.w2.qweight)}; expected {exp2}")
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
            dtype = getattr(torch, str(meta["dtype"]))
            return cls(w13=weights("w13"), w2=weights("w2"), num_experts=int(meta["num_experts"]),
                       hidden_size=int(meta["hidden_size"]),
                       intermediate_size=int(meta["intermediate_size"]), dtype=dtype)
        except KeyError as exc:
            raise ValueError(f"packed experts metadata lacks {exc.args[0]!r}") from None


def save_packed(path: str | os.PathLike, layers: dict[int, PackedExperts],
                extra_metadata: dict[str, str] | None = None) -> None:
    """Write MoE layers (layer index -> experts) to one safetensors file with metadata.

    Written to a temporary name and renamed, so an interrupted save leaves nothing behind.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, object] = {}
    for idx, experts in sorted(layers.items()):
        tensors.update({k: v.contiguous().cpu()
                        for k, v in experts.state_dict(f"layers.{idx}.").items()})
        layer_meta[str(idx)] = experts.metadata()
    meta = {"format": "w4a16moe", "format_version": FORMAT_VERSION,
            "layers": json.dumps(layer_meta)}
    meta.update(extra_metadata or {})
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu"
                ) -> dict[int, PackedExperts]:
    """Read a file written by :func:`save_packed`."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "w4a16moe":
                raise ValueError(
                    f"{path} is not a w4a16moe packed file (metadata format="
                    f"{meta.get('format')!r}; expected 'w4a16moe')"
                )
            layer_meta = json.loads(meta["layers"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"cannot read packed experts from {path}: {exc}") from exc
    return {int(idx): PackedExperts.from_state_dict(tensors, m, prefix=f"layers.{idx}.")
            for idx, m in layer_meta.items()}
