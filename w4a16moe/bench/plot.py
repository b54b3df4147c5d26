"""PNG of layer time versus token count (log-log), one panel per model.

Each path is a line of ``kernel_us``; the floor (bytes / bandwidth, flops / matmul rate) is a
dashed black line and the bf16 baseline a dotted grey one. Needs matplotlib
(``pip install 'w4a16moe[plot]'``), imported only when a plot is made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'w4a16moe[plot]' "
                          "(or pip install matplotlib)") from None
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_records(records: Sequence[dict], path: str | os.PathLike, title: str | None = None,
                 metric: str = "kernel_us") -> str:
    """Write a PNG of ``metric`` (``kernel_us`` or ``layer_us``) against M for the records
    of :func:`~w4a16moe.bench.layer.bench_layer`; returns the path written."""
    if metric not in ("kernel_us", "layer_us"):
        raise ValueError(f"metric is {metric!r}; expected 'kernel_us' or 'layer_us'")
    rows = [r for r in records if r.get(metric)]
    if not rows:
        raise ValueError(f"no records with {metric} to plot")
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = _figure(figsize=(6.5 * len(models), 4.8))
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for name in dict.fromkeys(r["path"] for r in mine):
            if name == "bf16" and metric == "kernel_us":
                continue  # drawn below as the bf16 baseline line
            pts = sorted((r["M"], r[metric]) for r in mine if r["path"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        floor = sorted({(r["M"], r["floor_us"]) for r in mine if r.get("floor_us")})
        if floor:
            ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", lw=1,
                    label="floor (int4)")
        bf16 = sorted({(r["M"], r["bf16_us"]) for r in mine if r.get("bf16_us")})
        if bf16 and metric == "kernel_us":
            ax.plot([p[0] for p in bf16], [p[1] for p in bf16], ":", color="grey",
                    label="bf16 baseline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel(f"{metric.replace('_us', '')} time (us)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    gpu = rows[0].get("gpu", "")
    fig.suptitle(title or f"MoE layer time vs tokens ({gpu})")
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    return path
