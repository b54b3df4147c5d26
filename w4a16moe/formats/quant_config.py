"""Read the quantization settings of a checkpoint (GPTQ, AWQ, compressed-tensors).

``read_quant_config(path)`` looks, in order, at ``config.json`` ``quantization_config`` (or
``compression_config``, the older compressed-tensors key), then ``quantize_config.json``
(AutoGPTQ / GPTQModel) and ``quant_config.json`` (AutoAWQ). The result describes the default
weight scheme and the per-module rules, and :meth:`QuantConfig.scheme_for` answers, for one
module name such as ``model.layers.0.mlp.experts.3.gate_proj``, which scheme applies or why
the module is not quantized.

Module-name rules follow the tools that write the checkpoints:

- GPTQ ``dynamic``: an ordered ``{pattern: overrides}`` map; the first pattern that
  ``re.match``-es the module decides. ``-:pattern`` excludes the module from quantization;
  ``+:pattern`` or a bare pattern overrides ``bits`` / ``group_size`` / ``sym`` / ``desc_act``.
- AWQ ``modules_to_not_convert``: a module whose name contains one of the strings is left
  unquantized.
- compressed-tensors ``ignore`` and each config group's ``targets``: ``re:pattern``
  (``re.match``), an exact module name, or a layer class name (``Linear``: every expert
  projection is a linear layer). When several groups target a module, an exact name wins over
  a regex, which wins over a class name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

#: ``quant_method`` values this package converts
QUANT_METHODS = ("gptq", "awq", "compressed-tensors")
#: class names a compressed-tensors target may use for an expert projection
_LINEAR_CLASS_NAMES = ("Linear", "nn.Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear")


@dataclass(frozen=True)
class WeightScheme:
    """How one module's weights are quantized.

    Attributes:
        bits: bits per weight (only 4 converts).
        group_size: input columns per scale; ``-1`` for one group per output channel.
        symmetric: no stored zero point (GPTQ still stores a constant one, see gptq.py).
        act_order: GPTQ ``desc_act`` / compressed-tensors ``actorder``; the ``g_idx`` tensor,
            when present, is what the converter follows.
        format: compressed-tensors compression format of this scheme (``pack-quantized``);
            empty for GPTQ and AWQ.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    format: str = ""


@dataclass(frozen=True)
class QuantConfig:
    """The quantization settings of one checkpoint.

    Attributes:
        method: ``"gptq"``, ``"awq"`` or ``"compressed-tensors"``.
        checkpoint_format: ``"gptq"`` (v1: zero points stored minus one) or ``"gptq_v2"`` for
            GPTQ, ``"gemm"`` for AWQ, the compression format (``"pack-quantized"``) for
            compressed-tensors.
        default: the scheme of a module no rule singles out.
        dynamic: GPTQ per-module rules, ``(pattern, overrides)`` in file order.
        groups: compressed-tensors config groups, ``(name, targets, scheme)``.
        ignore: compressed-tensors ``ignore`` entries or AWQ ``modules_to_not_convert``.
        source: the file the settings came from.
        raw: the settings as read (JSON object).
    """

    method: str
    checkpoint_format: str
    default: WeightScheme
    dynamic: tuple[tuple[str, dict], ...] = ()
    groups: tuple[tuple[str, tuple[str, ...], WeightScheme], ...] = ()
    ignore: tuple[str, ...] = ()
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def format_name(self) -> str:
        """A short name of the on-disk format: ``gptq``, ``gptq_v2``, ``awq-gemm``,
        ``compressed-tensors/pack-quantized``."""
        if self.method == "gptq":
            return self.checkpoint_format
        if self.method == "awq":
            return f"awq-{self.checkpoint_format}"
        return f"compressed-tensors/{self.checkpoint_format}"

    def scheme_for(self, module: str) -> tuple[WeightScheme | None, str]:
        """The scheme of ``module`` (a module name without ``.weight``), or ``(None, reason)``
        when the settings leave it unquantized."""
        if self.method == "gptq":
            for pattern, overrides in self.dynamic:
                if pattern.startswith("-:"):
                    if re.match(pattern[2:], module):
                        return None, f"excluded by GPTQ dynamic rule {pattern!r}"
                elif re.match(pattern.removeprefix("+:"), module):
                    return _apply_overrides(self.default, overrides, pattern), ""
            return self.default, ""
        if self.method == "awq":
            for key in self.ignore:
                if key in module:
                    return None, f"listed in AWQ modules_to_not_convert ({key!r})"
            return self.default, ""
        for entry in self.ignore:
            if _ct_match(entry, module):
                return None, f"in the compressed-tensors ignore list ({entry!r})"
        best: tuple[int, WeightScheme] | None = None
        for _name, targets, scheme in self.groups:
            for target in targets:
                rank = _ct_match(target, module)
                if rank and (best is None or rank > best[0]):
                    best = (rank, scheme)
        if best is None:
            return None, "targeted by no compressed-tensors config group"
        return best[1], ""


def _ct_match(target: str, module: str) -> int:
    """How a compressed-tensors target matches ``module``: 3 exact name, 2 regex, 1 class
    name, 0 no match."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if target == module:
        return 3
    if target in _LINEAR_CLASS_NAMES:
        return 1
    return 0


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is {value!r}; expected an integer")
    return value


def _apply_overrides(base: WeightScheme, overrides: dict, pattern: str) -> WeightScheme:
    if not isinstance(overrides, dict):
        raise ValueError(f"GPTQ dynamic rule {pattern!r} maps to {overrides!r}; expected an "
                         "object of overrides")
    return WeightScheme(
        bits=_as_int(overrides.get("bits", base.bits), f"dynamic[{pattern!r}].bits"),
        group_size=_as_int(overrides.get("group_size", base.group_size),
                           f"dynamic[{pattern!r}].group_size"),
        symmetric=bool(overrides.get("sym", base.symmetric)),
        act_order=bool(overrides.get("desc_act", base.act_order)),
    )


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _find_raw(path: str) -> tuple[dict, str] | None:
    """(settings, file) or None when the checkpoint has no quantization settings."""
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        cfg = _load_json(cfg_path)
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path} holds a {type(cfg).__name__}; expected a JSON object")
        for key in ("quantization_config", "compression_config"):
            if isinstance(cfg.get(key), dict):
                return cfg[key], f"{cfg_path} ({key})"
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            raw = _load_json(p)
            if not isinstance(raw, dict):
                raise ValueError(f"{p} holds a {type(raw).__name__}; expected a JSON object")
            raw = dict(raw)
            raw.setdefault("quant_method", method)
            return raw, p
    return None


def read_quant_config(path: str | os.PathLike) -> QuantConfig | None:
    """The quantization settings of the checkpoint directory ``path``; ``None`` when it has
    none (an unquantized model). ``ValueError`` for an unknown ``quant_method``, an
    unsupported on-disk format, or malformed settings."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is not a directory")
    found = _find_raw(path)
    if found is None:
        return None
    raw, source = found
    method = str(raw.get("quant_method", "")).lower().replace("_", "-")
    if method == "gptq":
        return _gptq_config(raw, source)
    if method == "awq":
        return _awq_config(raw, source)
    if method == "compressed-tensors":
        return _ct_config(raw, source)
    raise ValueError(f"{source}: quant_method is {raw.get('quant_method')!r}; expected one of "
                     f"{QUANT_METHODS}")


def _gptq_config(raw: dict, source: str) -> QuantConfig:
    fmt = str(raw.get("checkpoint_format") or raw.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{source}: GPTQ checkpoint_format is {fmt!r}; expected 'gptq' (v1) "
                         "or 'gptq_v2' (other formats are kernel-specific repackings)")
    default = WeightScheme(
        bits=_as_int(raw.get("bits", 4), f"{source}: bits"),
        group_size=_as_int(raw.get("group_size", 128), f"{source}: group_size"),
        symmetric=bool(raw.get("sym", True)),
        act_order=bool(raw.get("desc_act", False)),
    )
    dynamic = raw.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"{source}: dynamic is a {type(dynamic).__name__}; expected an object")
    for pattern in dynamic:
        try:
            re.compile(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern)
        except re.error as exc:
            raise ValueError(f"{source}: dynamic rule {pattern!r} is not a regex: {exc}") from None
    return QuantConfig(method="gptq", checkpoint_format=fmt, default=default,
                       dynamic=tuple(dynamic.items()), source=source, raw=raw)


def _awq_config(raw: dict, source: str) -> QuantConfig:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{source}: AWQ version is {version!r}; expected 'gemm' (GEMV and "
                         "kernel-specific AWQ layouts are not converted)")
    if raw.get("zero_point", True) is False:
        raise ValueError(f"{source}: AWQ zero_point is false; the AWQ GEMM format always "
                         "stores zero points, so this checkpoint is not one")
    default = WeightScheme(
        bits=_as_int(raw.get("bits", raw.get("w_bit", 4)), f"{source}: bits"),
        group_size=_as_int(raw.get("group_size", raw.get("q_group_size", 128)),
                           f"{source}: group_size"),
        symmetric=False,
        act_order=False,
    )
    ignore = raw.get("modules_to_not_convert") or []
    if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
        raise ValueError(f"{source}: modules_to_not_convert is {ignore!r}; expected a list of "
                         "strings")
    return QuantConfig(method="awq", checkpoint_format="gemm", default=default,
                       ignore=tuple(ignore), source=source, raw=raw)


def _ct_scheme(weights: dict, fmt: str, where: str) -> WeightScheme:
    kind = str(weights.get("type", "int")).lower()
    if kind != "int":
        raise ValueError(f"{where}: weights type is {kind!r}; expected 'int'")
    strategy = str(weights.get("strategy", "group")).lower()
    bits = _as_int(weights.get("num_bits", 4), f"{where}: num_bits")
    if strategy == "group":
        group = _as_int(weights.get("group_size"), f"{where}: group_size")
        if group <= 0:
            raise ValueError(f"{where}: group_size is {group}; expected a positive integer "
                             "for strategy 'group'")
    elif strategy == "channel":
        group = -1
    else:
        raise ValueError(f"{where}: weights strategy is {strategy!r}; expected 'group' or "
                         "'channel'")
    actorder = weights.get("actorder")
    act = actorder not in (None, False, "weight", "static")
    return WeightScheme(bits=bits, group_size=group,
                        symmetric=bool(weights.get("symmetric", True)), act_order=act,
                        format=fmt)


def _ct_config(raw: dict, source: str) -> QuantConfig:
    top_fmt = str(raw.get("format", "pack-quantized"))
    groups_raw = raw.get("config_groups") or {}
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ValueError(f"{source}: compressed-tensors config has no config_groups")
    groups = []
    formats = set()
    for name, group in groups_raw.items():
        where = f"{source}: config_groups[{name!r}]"
        if not isinstance(group, dict):
            raise ValueError(f"{where} is a {type(group).__name__}; expected an object")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise ValueError(f"{where} has no weights scheme")
        fmt = str(group.get("format") or top_fmt)
        targets = group.get("targets") or []
        if isinstance(targets, str):
            targets = [targets]
        for t in targets:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as exc:
                    raise ValueError(f"{where}: target {t!r} is not a regex: {exc}") from None
        groups.append((str(name), tuple(targets), _ct_scheme(weights, fmt, where)))
        formats.add(fmt)
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
        raise ValueError(f"{source}: ignore is {ignore!r}; expected a list of strings")
    fmt = top_fmt if top_fmt != "mixed-precision" else "/".join(sorted(formats))
    return QuantConfig(method="compressed-tensors", checkpoint_format=fmt,
                       default=groups[0][2], groups=tuple(groups), ignore=tuple(ignore),
                       source=source, raw=raw)
