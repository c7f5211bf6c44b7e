"""Measurements of early-exit networks: fused vs concat forward, budgeted batches vs the whole network, and
static baselines at CIFAR size. Used by benchmarks/test_early_exit_bench.py and `python -m dynconv_ext exits`."""
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import models
from ..inference import EarlyExitRunner, exit_prior, thresholds_from_confidences, confidences
from .macs import LayerMacs
from .timing import interleaved_medians, with_env_switch

EARLY_EXIT_MODELS = {
    "msdnet_cifar": models.msdnet_cifar,
    "msdnet_cifar_budgeted": models.msdnet_cifar_budgeted,
    "ranet_cifar": models.ranet_cifar,
}

FUSED_COLUMNS = [
    ("model", "model", "{}"), ("batch", "N", "{}"), ("macs_M", "MACs (M/img)", "{:.1f}"),
    ("fused_ms", "fused ms", "{:.1f}"), ("cat_ms", "torch.cat ms", "{:.1f}"), ("cat_layout", "cat layout", "{}"),
    ("speedup", "fused vs cat", "{:.2f}x"),
]
BUDGET_COLUMNS = [
    ("model", "model", "{}"), ("batch", "N", "{}"), ("p", "prior p", "{:.2f}"), ("exits", "exit histogram", "{}"),
    ("macs_avg_M", "MACs avg (M/img)", "{:.1f}"), ("macs_full_M", "MACs all exits (M/img)", "{:.1f}"),
    ("runner_ms", "early-exit ms", "{:.1f}"), ("full_ms", "all exits ms", "{:.1f}"),
    ("gain", "throughput gain", "{:.2f}x"), ("mac_ratio", "MAC ratio", "{:.2f}x"),
    ("efficiency", "gain / MAC ratio", "{:.2f}"),
]
STATIC_COLUMNS = [
    ("model", "model", "{}"), ("mode", "how", "{}"), ("batch", "N", "{}"), ("macs_M", "MACs (M/img)", "{:.1f}"),
    ("ms_per_image", "ms / image", "{:.2f}"),
]


def _cifar_input(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)


def build(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return EARLY_EXIT_MODELS[name](num_classes=num_classes).eval()


def measure_fused_vs_cat(name: str, batch: int = 256, reps: int = 5) -> dict:
    """Whole network (every exit) with the fused concat ops vs the same network on torch.cat (eager, the
    official structure; the faster of NCHW and channels-last input)."""
    net = build(name)
    x_cl = _cifar_input(batch)
    x_nchw = x_cl.contiguous()

    def run(fused, x):
        def fn():
            net.fused = fused
            return net(x)
        return fn

    t = interleaved_medians({"fused": run(True, x_cl), "cat_nchw": run(False, x_nchw), "cat_cl": run(False, x_cl)},
                            reps=reps, warmup=1)
    net.fused = True
    cat_key = min(("cat_nchw", "cat_cl"), key=t.get)
    return {"model": name, "batch": batch, "macs_M": sum(net.exit_macs()) / 1e6, "fused_ms": t["fused"],
            "cat_ms": t[cat_key], "cat_layout": cat_key[4:], "speedup": t[cat_key] / t["fused"]}


def measure_budgeted(name: str, priors=(0.5, 0.8, 1.0, 1.2), batch: int = 256, reps: int = 5,
                     net: Optional[nn.Module] = None) -> List[dict]:
    """Budgeted-batch inference with thresholds calibrated (on a separate batch) for each prior vs running the
    whole network on the batch. gain = all-exits time / early-exit time; MAC ratio = all-exits MACs / average
    executed MACs; an ideal runtime reaches gain == MAC ratio."""
    net = net if net is not None else build(name)
    calib, x = _cifar_input(batch, seed=1), _cifar_input(batch, seed=2)
    with torch.inference_mode():
        conf = confidences(net(calib))
    full_macs = sum(net.exit_macs())
    rows = []
    for p in priors:
        runner = EarlyExitRunner(net, thresholds_from_confidences(conf, exit_prior(p, net.num_exits)))
        with torch.inference_mode():
            result = runner(x)
        t = interleaved_medians({"runner": lambda: runner(x), "full": lambda: net(x)}, reps=reps, warmup=1)
        avg = float(result.macs.double().mean())
        rows.append({"model": name, "batch": batch, "p": p,
                     "exits": "/".join(str(int(c)) for c in result.histogram(net.num_exits)),
                     "macs_avg_M": avg / 1e6, "macs_full_M": full_macs / 1e6, "runner_ms": t["runner"],
                     "full_ms": t["full"], "gain": t["full"] / t["runner"], "mac_ratio": full_macs / avg,
                     "efficiency": (t["full"] / t["runner"]) / (full_macs / avg)})
    return rows


def measure_switch_ab(name: str, var: str, batch: int = 256, reps: int = 5, priors=(0.5, 1.0)) -> Dict[str, float]:
    """Median ms of the whole network (keys "full_on", "full_off") and of the budgeted-batch runner at each prior
    ("p{p}_on", "p{p}_off", thresholds calibrated on a separate batch) with the CPU kernel switch `var` set to 1 and
    0, all interleaved in one process (python/tools/*_ab.py)."""
    net = build(name)
    calib, x = _cifar_input(batch, seed=1), _cifar_input(batch, seed=2)
    with torch.inference_mode():
        conf = confidences(net(calib))
    fns = {"full_on": with_env_switch(lambda: net(x), var, True),
           "full_off": with_env_switch(lambda: net(x), var, False)}
    for p in priors:
        runner = EarlyExitRunner(net, thresholds_from_confidences(conf, exit_prior(p, net.num_exits)))
        fns[f"p{p}_on"] = with_env_switch(lambda r=runner: r(x), var, True)
        fns[f"p{p}_off"] = with_env_switch(lambda r=runner: r(x), var, False)
    return interleaved_medians(fns, reps=reps, warmup=1)


def switch_ab_rows(t: Dict[str, float], priors=(0.5, 1.0), prefix: str = "") -> List[str]:
    """Markdown rows `prefix| run | on ms | off ms | speedup |` of a :func:`measure_switch_ab` result (the budgeted
    runs with their gain over all exits under the same setting)."""
    rows = [f"{prefix}| all exits | {t['full_on']:.1f} | {t['full_off']:.1f} | {t['full_off'] / t['full_on']:.2f}x |"]
    for p in priors:
        on, off = t[f"p{p}_on"], t[f"p{p}_off"]
        rows.append(f"{prefix}| budgeted p={p} | {on:.1f} (gain {t['full_on'] / on:.2f}x) | "
                    f"{off:.1f} (gain {t['full_off'] / off:.2f}x) | {off / on:.2f}x |")
    return rows


def vgg16_cifar(num_classes: int = 100) -> nn.Module:
    """VGG-16 with BN for 32x32 inputs (13 3x3 convs in the cfg-D plan, 5 max-pools, one Linear 512 -> classes)."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, c = [], 3
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


def resnet50_cifar(num_classes: int = 100) -> nn.Module:
    """torchvision's ResNet-50 with the usual CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    import torchvision
    net = torchvision.models.resnet50(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _static_macs(net: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode(), LayerMacs(net) as counter:
        net(x[:1])
    return counter.total


def measure_static_comparison(batch: int = 1, reps: int = 20, prior: float = 1.0, calib_batch: int = 256,
                              early_exit_models=("ranet_cifar", "msdnet_cifar"), images: int = 32) -> List[dict]:
    """Per-image latency at CIFAR size of RANet (every exit; budgeted at `prior`, averaged over `images` images)
    vs VGG-16 and ResNet-50 (the comparison of the RANet reproduction study), and the same for MSDNet."""
    x = _cifar_input(batch, seed=3)
    rows = []
    for name, net in (("vgg16_bn (CIFAR)", vgg16_cifar().eval()), ("resnet50 (CIFAR stem)", resnet50_cifar().eval())):
        t = interleaved_medians({"m": lambda: net(x)}, reps=reps, warmup=2)["m"]
        rows.append({"model": name, "mode": "static", "batch": batch, "macs_M": _static_macs(net, x) / 1e6,
                     "ms_per_image": t / batch})
    for name in early_exit_models:
        net = build(name)
        with torch.inference_mode():
            conf = confidences(net(_cifar_input(calib_batch, seed=1)))
        runner = EarlyExitRunner(net, thresholds_from_confidences(conf, exit_prior(prior, net.num_exits)))
        # an image's early-exit latency depends on where it exits: the budgeted row averages `images` different
        # images, each run on its own in batches of `batch`
        xs = _cifar_input(images * batch, seed=4)
        chunks = [xs[i:i + batch] for i in range(0, xs.shape[0], batch)]
        t = interleaved_medians({"all": lambda: net(x), "budget": lambda: [runner(c) for c in chunks]},
                                reps=max(3, reps // 4), warmup=1)
        with torch.inference_mode():
            macs = float(runner(xs).macs.double().mean())
        rows.append({"model": name, "mode": "all exits (fused)", "batch": batch,
                     "macs_M": sum(net.exit_macs()) / 1e6, "ms_per_image": t["all"] / batch})
        rows.append({"model": name, "mode": f"budgeted p={prior:g} (early exit, mean of {images})", "batch": batch,
                     "macs_M": macs / 1e6, "ms_per_image": t["budget"] / xs.shape[0]})
    return rows


def plot_budgeted(rows: List[dict], path: str, title: Optional[str] = None) -> bool:
    """Measured throughput gain vs the MAC ratio (the ideal), one line per model."""
    from .masked_conv_table import _pyplot, _save_figure
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    by_model: Dict[str, List[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    top = max(r["mac_ratio"] for r in rows)
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="ideal (gain = MAC ratio)")
    ax.plot([1, top], [0.85, 0.85 * top], "k:", lw=0.8, label="0.85 x MAC ratio")
    for model, rs in by_model.items():
        rs = sorted(rs, key=lambda r: r["mac_ratio"])
        ax.plot([r["mac_ratio"] for r in rs], [r["gain"] for r in rs], "o-", label=model)
    ax.set_xlabel("MAC ratio (all exits / average executed)")
    ax.set_ylabel("measured throughput gain over all exits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(plt, fig, path, title)
    return True
