"""The MAC-vs-latency table of masked_conv2d on ResNet layer shapes (CLI `bench` and benchmarks/).

Every row times, in alternation: PyTorch's dense conv in NCHW and in channels-last (the faster counts
as "dense"), our op with backend="auto" (what users get) and "cpp" (the sparse kernel at every density),
and the plain-PyTorch gather-scatter a user would write.
"""
import csv
import dataclasses
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import masked_conv2d
from .baselines import torch_gather_scatter_conv2d
from .macs import conv2d_macs
from .timing import interleaved_medians

# ResNet-50 stages at 224x224 input: (channels, spatial size).
RESNET_LAYERS = ((64, 56), (128, 28), (256, 14))


@dataclasses.dataclass(frozen=True)
class Case:
    channels: int
    size: int
    kernel: int
    batch: int
    block: int
    density: float

    @property
    def layer(self) -> str:
        return f"{self.channels}ch {self.size}x{self.size} {self.kernel}x{self.kernel}"

    @property
    def mask_kind(self) -> str:
        return "pixel" if self.block == 1 else f"block{self.block}"


def default_cases(batches: Sequence[int] = (1, 8), densities: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0),
                  blocks: Sequence[int] = (1, 4), kernels: Sequence[int] = (3, 1),
                  layers: Sequence = RESNET_LAYERS) -> List[Case]:
    return [Case(c, s, k, n, b, d) for (c, s) in layers for k in kernels for n in batches for b in blocks
            for d in densities]


def random_mask(batch: int, out_size: int, block: int, density: float, generator=None) -> torch.Tensor:
    """A Bernoulli(density) mask over b x b blocks of an out_size x out_size output."""
    cells = -(-out_size // block)
    return torch.rand(batch, cells, cells, generator=generator) < density


# Calls per turn in the layer table: the first (cold: caches evicted by the previous candidate, often a
# page-faulted fresh output) is reported separately; the median of the other 3 is the headline (warm).
TABLE_BURST = 4


def measure_case(case: Case, reps: int = 15, torch_baseline: bool = True, seed: int = 0,
                 burst: int = TABLE_BURST) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.channels, case.size, case.size, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(case.channels, case.channels, case.kernel, case.kernel, generator=g)
    b = torch.randn(case.channels, generator=g)
    pad = case.kernel // 2
    mask = random_mask(case.batch, case.size, case.block, case.density, g)
    fns = {
        "dense_nchw": lambda: F.conv2d(x, w, b, 1, pad),
        "dense_cl": lambda: F.conv2d(x_cl, w, b, 1, pad),
        "auto": lambda: masked_conv2d(x_cl, w, b, mask, 1, pad, block_size=case.block),
        "cpp": lambda: masked_conv2d(x_cl, w, b, mask, 1, pad, block_size=case.block, backend="cpp"),
    }
    if torch_baseline:
        fns["torch_gs"] = lambda: torch_gather_scatter_conv2d(x_cl, w, b, mask, 1, pad, block_size=case.block)
    cold = {}
    t = interleaved_medians(fns, reps=reps, burst=burst, cold=cold)
    pixels = case.batch * case.size * case.size
    active = int(mask.repeat_interleave(case.block, 1).repeat_interleave(case.block, 2)
                 [:, :case.size, :case.size].sum())
    dense_ms = min(t["dense_nchw"], t["dense_cl"])
    macs_dense = conv2d_macs(w.shape, pixels)
    macs = conv2d_macs(w.shape, active)
    return {
        "layer": case.layer, "batch": case.batch, "mask": case.mask_kind, "density": case.density,
        "active": active / pixels, "macs_executed_M": macs / 1e6, "macs_dense_M": macs_dense / 1e6,
        "auto_ms": t["auto"], "sparse_kernel_ms": t["cpp"], "dense_ms": dense_ms,
        "dense_nchw_ms": t["dense_nchw"], "dense_cl_ms": t["dense_cl"],
        "torch_gather_scatter_ms": t.get("torch_gs", float("nan")),
        "speedup": dense_ms / t["auto"], "kernel_speedup": dense_ms / t["cpp"],
        "auto_cold_ms": cold["auto"], "dense_cold_ms": min(cold["dense_nchw"], cold["dense_cl"]),
        "cold_speedup": min(cold["dense_nchw"], cold["dense_cl"]) / cold["auto"],
        "ideal_speedup": macs_dense / max(macs, 1),
    }


def run_table(cases: Iterable[Case], reps: int = 15, progress: bool = True, torch_baseline: bool = True) -> List[dict]:
    cases = list(cases)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases), desc="masked_conv2d", unit="case")
        except ImportError:
            pass
    rows = []
    for case in cases:
        rows.append(measure_case(case, reps=reps, torch_baseline=torch_baseline))
        if bar is not None:
            bar.set_postfix_str(f"{case.layer} n{case.batch} {case.mask_kind} d={case.density}")
            bar.update()
    if bar is not None:
        bar.close()
    return rows


COLUMNS = [
    ("layer", "layer", "{}"), ("batch", "N", "{}"), ("mask", "mask", "{}"), ("density", "density", "{:.2f}"),
    ("active", "active", "{:.3f}"), ("macs_executed_M", "MACs exec (M)", "{:.0f}"),
    ("macs_dense_M", "MACs dense (M)", "{:.0f}"), ("auto_ms", "ours ms", "{:.3f}"),
    ("sparse_kernel_ms", "kernel ms", "{:.3f}"), ("dense_ms", "dense ms", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"), ("kernel_speedup", "kernel speedup", "{:.2f}x"),
    ("ideal_speedup", "ideal", "{:.2f}x"), ("cold_speedup", "cold speedup", "{:.2f}x"),
    ("torch_gather_scatter_ms", "torch g-s ms", "{:.3f}"),
]


TIMING_NOTE = (f"Timing: candidates interleaved in a fresh shuffled order every round; each turn calls one "
               f"{TABLE_BURST} times back to back. `ours ms`, `kernel ms`, `dense ms` and the speedups are medians "
               f"of the warm calls (all but the first of a turn); `cold speedup` is best dense / ours over the first "
               f"calls only (caches evicted by the previous candidate, often a page-faulted fresh output buffer).")


def format_markdown(rows: List[dict], columns=None) -> str:
    """A markdown table of `rows`; `columns` is a list of (key, header, format), default COLUMNS."""
    columns = columns or COLUMNS
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) for k, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(plt, fig, path: str, title: Optional[str]) -> None:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: List[dict], path: str, title: Optional[str] = None) -> bool:
    """Speedup over dense vs density, one panel per layer; returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in rows if r["active"] > 0]  # an empty mask has no meaningful ratio
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    # 3x3 layers on the top row, 1x1 below (when both are present).
    kxk = [lay for lay in layers if not lay.endswith("1x1")]
    one = [lay for lay in layers if lay.endswith("1x1")]
    grid = [g for g in (kxk, one) if g]
    ncols = max(len(g) for g in grid)
    fig, axes = plt.subplots(len(grid), ncols, figsize=(4.2 * ncols, 3.4 * len(grid)), squeeze=False)
    for gi, group in enumerate(grid):
        for ax in axes[gi][len(group):]:
            ax.axis("off")
        for ax, layer in zip(axes[gi], group):
            sel = [r for r in rows if r["layer"] == layer]
            for (batch, mask) in dict.fromkeys((r["batch"], r["mask"]) for r in sel):
                pts = sorted((r["active"], r["speedup"]) for r in sel if r["batch"] == batch and r["mask"] == mask)
                ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=f"N={batch} {mask}")
            xs = [i / 100 for i in range(8, 101)]
            ax.plot(xs, [1 / x for x in xs], "k:", label="ideal (MAC ratio)")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylim(0.5, 15)
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("active density")
            ax.set_title(layer)
            ax.grid(alpha=0.3, which="both")
        axes[gi][0].set_ylabel("speedup over best dense conv")
    axes[0][len(grid[0]) - 1].legend(fontsize=7)
    _save_figure(plt, fig, path, title)
    return True


def plot_models(tables: dict, path: str, title: Optional[str] = None) -> bool:
    """End-to-end speedup vs active density, one panel per model table ({name: rows}); False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(tables), figsize=(4.4 * len(tables), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        for mask in dict.fromkeys(r["mask"] for r in rows):
            sel = sorted((r for r in rows if r["mask"] == mask), key=lambda r: r["active"])
            xs = [r["active"] for r in sel]
            ax.plot(xs, [r["speedup_eager"] for r in sel], marker="o", label=f"{mask} vs eager dense")
            if all(r["speedup_folded"] == r["speedup_folded"] for r in sel):  # not NaN
                ax.plot(xs, [r["speedup_folded"] for r in sel], marker="s", ls="--", label=f"{mask} vs BN-folded")
            ax.plot(xs, [r["ideal_speedup"] for r in sel], "k:", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(rows[0]["model"].split(" (")[0])
        ax.set_xlabel("active density of the gated blocks")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("end-to-end speedup (dotted: MAC ratio)")
    _save_figure(plt, fig, path, title)
    return True
