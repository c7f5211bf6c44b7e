"""Train and evaluate a DynConv model (gated residual blocks) with a computational budget.

    python python/examples/train_dynconv.py --model dynconv_resnet32 --budget 0.5 --data digits --epochs 10
    torchrun --nproc_per_node 2 python/examples/train_dynconv.py ...     # DistributedDataParallel (gloo / nccl)
    python python/examples/train_dynconv.py --eval-only --resume --out runs/r32   # evaluate a checkpoint

Data (--data):
  digits               built in, offline: scikit-learn's 8x8 digits, upscaled to 32x32 RGB (10 classes)
  cifar10:DIR          the CIFAR-10 python pickle batches in DIR (data_batch_1..5, test_batch); no download
  cifar100:DIR         the CIFAR-100 python pickles in DIR (train, test)
  imagefolder:DIR      DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, 224x224 crops

Writes to --out: log.csv (one row per epoch), checkpoint.pt (latest; --resume continues from it) and masks.png
(the execution masks of a few validation images). Evaluation prints accuracy, average executed MACs against
the dense MACs, and the measured latency of a batch in eval mode (where skipped pixels are not computed).
"""
import argparse
import csv
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from dynconv_ext import models
from dynconv_ext.nn import SparsityCriterion
from example_data import MEAN, STD, augment, load_data, progress, setup_process


@torch.no_grad()
def evaluate(net, loader, device, show_progress=True):
    net.eval()
    correct = total = 0
    macs_sum, dense = 0.0, 0.0
    density = []
    for x, y in progress(loader, show_progress, desc="eval", leave=False):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        logits = net(x)
        stats = models.executed_macs(net)
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
        macs_sum += float(stats["executed"].sum())
        dense = stats["dense"]
        density += [float(s["density"].mean()) for s in stats["per_block"]]
    x = next(iter(loader))[0].to(device).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        net(x)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    latency = (time.perf_counter() - t0) / reps * 1e3
    return {"acc": correct / max(total, 1), "macs": macs_sum / max(total, 1), "dense_macs": dense,
            "density": sum(density) / max(len(density), 1), "latency_ms": latency, "batch": x.shape[0]}


def save_mask_picture(net, dataset, path, device, count=6):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("masks.png skipped: matplotlib is not installed")
        return
    net.eval()
    x = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    with torch.no_grad():
        net(x.contiguous(memory_format=torch.channels_last))
    blocks = models.gated_blocks(net)
    shown = [blocks[0], blocks[len(blocks) // 2], blocks[-1]]
    fig, axes = plt.subplots(count, 1 + len(shown), figsize=(2 * (1 + len(shown)), 2 * count), squeeze=False)
    img = (x.cpu() * STD + MEAN).clamp(0, 1).permute(0, 2, 3, 1)
    for r in range(count):
        axes[r][0].imshow(img[r])
        axes[r][0].set_title("input" if r == 0 else "")
        for c, b in enumerate(shown, 1):
            axes[r][c].imshow(b.last_mask[r].cpu().float(), vmin=0, vmax=1, cmap="viridis")
            if r == 0:
                axes[r][c].set_title(f"block {blocks.index(b)} mask")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dynconv_resnet32",
                   choices=["dynconv_resnet32", "dynconv_resnet18", "dynconv_resnet34", "dynconv_resnet50",
                            "dynconv_resnet101"])
    p.add_argument("--data", default="digits")
    p.add_argument("--budget", type=float, default=0.5, help="target fraction of conditional MACs")
    p.add_argument("--sparsity-weight", type=float, default=10.0)
    p.add_argument("--block-size", type=int, default=1, help="mask granularity (b x b output blocks)")
    p.add_argument("--tau-start", type=float, default=1.0, help="Gumbel-sigmoid temperature at the start")
    p.add_argument("--tau-end", type=float, default=0.5, help="... annealed exponentially to this at the end")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=0, help="at most this many steps per epoch (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dynconv")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-before", action="store_true", help="also evaluate before training (logged as epoch 0)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: one GPU per process when there are enough GPUs, else CPU")
    args = p.parse_args(argv)

    device, distributed, rank, world = setup_process(args.device, args.threads, args.seed)
    show = not args.no_progress and rank == 0
    os.makedirs(args.out, exist_ok=True)

    train_set, val_set, classes = load_data(args.data, args.seed)
    net = getattr(models, args.model)(num_classes=classes, block_size=args.block_size).to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    start_epoch = 0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume or args.eval_only:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume/--eval-only: {ckpt_path} not found")
        ckpt = torch.load(ckpt_path, map_location=device)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if distributed else None
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val_set, args.batch_size)
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    crit = SparsityCriterion(args.budget, weight=args.sparsity_weight)
    steps_per_epoch = min(len(train_loader), args.steps) if args.steps else len(train_loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.epochs * steps_per_epoch))
    for _ in range(start_epoch * steps_per_epoch):
        sched.step()

    log_path = os.path.join(args.out, "log.csv")
    fields = ["epoch", "train_loss", "task_loss", "train_density", "val_acc", "val_macs_M", "dense_macs_M",
              "val_density", "latency_ms", "batch"]
    if rank == 0 and (not os.path.exists(log_path) or not args.resume):
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()

    def log_eval(epoch, ev, tot=float("nan"), task=float("nan"), dens=float("nan")):
        row = {"epoch": epoch, "train_loss": tot, "task_loss": task, "train_density": dens,
               "val_acc": ev["acc"], "val_macs_M": ev["macs"] / 1e6, "dense_macs_M": ev["dense_macs"] / 1e6,
               "val_density": ev["density"], "latency_ms": ev["latency_ms"], "batch": ev["batch"]}
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, fields).writerow(row)
        return row

    if args.eval_before and rank == 0 and not args.eval_only:
        ev = evaluate(net, val_loader, device, show)
        log_eval(start_epoch, ev)
        print(f"before training: val acc {ev['acc']:.3f}, density {ev['density']:.2f}", flush=True)
    epochs = range(start_epoch, start_epoch) if args.eval_only else range(start_epoch, args.epochs)
    for epoch in epochs:
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        tot = task_tot = dens_tot = 0.0
        it = progress(train_loader, show, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch)
        for step, (x, y) in enumerate(it):
            if step >= steps_per_epoch:
                break
            frac = (epoch + step / steps_per_epoch) / args.epochs
            tau = args.tau_start * (args.tau_end / args.tau_start) ** frac  # exponential temperature schedule
            for b in models.gated_blocks(net):
                b.gate.tau = tau
            x = augment(x.to(device)).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            logits = model(x)
            stats = models.executed_macs(net)["per_block"]
            task = F.cross_entropy(logits, y)
            loss = task + crit(stats, progress=frac)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            density = float(torch.stack([s["density"].detach().mean() for s in stats]).mean())
            tot, task_tot, dens_tot = tot + loss.item(), task_tot + task.item(), dens_tot + density
            if show and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss.item():.3f}", density=f"{density:.2f}", tau=f"{tau:.2f}")
        n = max(1, min(steps_per_epoch, step + 1))
        if rank == 0:
            ev = evaluate(net, val_loader, device, show)
            row = log_eval(epoch + 1, ev, tot / n, task_tot / n, dens_tot / n)
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                        "args": vars(args)}, ckpt_path)
            print(f"epoch {epoch + 1}: loss {row['train_loss']:.3f} (task {row['task_loss']:.3f}), "
                  f"val acc {ev['acc']:.3f}, MACs {ev['macs'] / 1e6:.1f}M of {ev['dense_macs'] / 1e6:.1f}M "
                  f"({ev['macs'] / ev['dense_macs']:.2f}), density {ev['density']:.2f}, "
                  f"latency {ev['latency_ms']:.1f} ms / batch of {ev['batch']}", flush=True)
    if rank == 0:
        if args.eval_only:
            ev = evaluate(net, val_loader, device, show)
            print(f"eval: acc {ev['acc']:.3f}, MACs {ev['macs'] / 1e6:.1f}M of {ev['dense_macs'] / 1e6:.1f}M, "
                  f"density {ev['density']:.2f}, latency {ev['latency_ms']:.1f} ms / batch of {ev['batch']}")
        save_mask_picture(net, val_set, os.path.join(args.out, "masks.png"), device)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
