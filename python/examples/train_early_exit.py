"""Train and evaluate an early-exit network (MSDNet, RANet): anytime prediction and budgeted batches.

    python python/examples/train_early_exit.py --model msdnet_cifar --data digits --epochs 10 --out runs/msd
    torchrun --nproc_per_node 2 python/examples/train_early_exit.py ...   # DistributedDataParallel (gloo / nccl)
    python python/examples/train_early_exit.py --model msdnet_cifar --eval-only --out runs/msd   # a checkpoint

Data (--data):
  digits               built in, offline: scikit-learn's 8x8 digits, upscaled to 32x32 RGB (10 classes)
  cifar10:DIR          the CIFAR-10 python pickle batches in DIR (data_batch_1..5, test_batch); no download
  cifar100:DIR         the CIFAR-100 python pickles in DIR (train, test)
  imagefolder:DIR      DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, 224x224 crops (msdnet_imagenet,
                       ranet_imagenet)

Training: all exits jointly, loss = the sum of every exit's cross-entropy with equal weights (as MSDNet and
RANet train); SGD with momentum 0.9 (Nesterov), weight decay 1e-4; the learning rate follows a cosine curve
per step (--lr-schedule cosine, default) or drops 10x at 50 % and 75 % of training (--lr-schedule step, MSDNet's
schedule); random crop + flip on 32x32 data; channels-last.

Evaluation (after training, or with --eval-only), printed and written to --out:
  anytime.csv     per exit: accuracy on the validation set, cumulative MACs per image (what answering at that
                  exit costs) and the measured latency per image of stopping every sample there
  budgeted.csv    budgeted batches: the validation set is split (fixed seed) into a calibration half and a test
                  half; for every prior p of --priors the thresholds are calibrated on the calibration half
                  (exit proportions q_k ~ p^k) and EarlyExitRunner runs the test half in batches of
                  --eval-batch-size, so exited samples really leave the batch: accuracy, average executed MACs
                  per image, the exit histogram, and the measured time per image against the all-exits forward
  budgeted.png    two panels: accuracy vs average MACs, accuracy vs measured latency per image
  exit_histogram.png / printed bars: where the test samples leave at --prior
Also log.csv (one row per epoch: summed training loss, per-exit validation accuracy, ...) and checkpoint.pt
(latest; --resume continues from it, --eval-only evaluates it).
"""
import argparse
import csv
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from dynconv_ext import models
from dynconv_ext.inference import (EarlyExitRunner, confidences, exit_prior, simulate_exits,
                                   thresholds_from_confidences)
from dynconv_ext.profile.timing import interleaved_medians, machine_description
from example_data import augment, load_data, progress, setup_process

MODELS = ["msdnet_cifar", "msdnet_cifar_budgeted", "msdnet_imagenet", "ranet_cifar", "ranet_imagenet"]
DEFAULT_PRIORS = "0.05,0.1,0.2,0.35,0.5,0.7,1.0,1.3,1.6,2.0"


def lr_factor(schedule: str, frac: float) -> float:
    """Learning-rate multiplier at training progress ``frac`` in [0, 1)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))  # step: /10 at 50 % and at 75 % (MSDNet)


def to_input(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def all_exit_logits(net, loader, device, show_progress=True):
    """([K, N, classes] logits of every exit on the CPU, [N] labels) over ``loader``, in eval mode."""
    net.eval()
    outs, labels = [], []
    for x, y in progress(loader, show_progress, desc="eval", leave=False):
        outs.append(torch.stack(net(to_input(x, device))).float().cpu())
        labels.append(y)
    return torch.cat(outs, dim=1), torch.cat(labels)


def per_exit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels.unsqueeze(0)).double().mean(1)


def parse_priors(text: str):
    try:
        priors = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--priors {text!r}: expected comma-separated numbers, e.g. {DEFAULT_PRIORS}")
    if not priors or min(priors) <= 0:
        raise SystemExit(f"--priors {text!r}: every prior must be > 0")
    return priors


def bar_chart(counts, labels, width=40):
    top = max(1, max(counts))
    return "\n".join(f"  {lab}  {c:6d} {'#' * int(round(width * c / top))}" for lab, c in zip(labels, counts))


def evaluate(net, val_set, args, device, show):
    """The anytime table, the budgeted-batch sweep and the exit histogram; returns (anytime rows, budgeted rows)."""
    num_exits = net.num_exits
    if args.eval_samples:
        val_set = Subset(val_set, range(min(args.eval_samples, len(val_set))))
    n = len(val_set)
    if n < 4:
        raise SystemExit(f"evaluation needs at least 4 validation images, got {n}")
    loader = DataLoader(val_set, args.eval_batch_size)
    logits, labels = all_exit_logits(net, loader, device, show)
    input_size = tuple(val_set[0][0].shape)
    priors = sorted(set(args.priors) | {args.prior})

    # Calibration half / test half (fixed seed).
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    cal_idx, test_idx = perm[: n // 2], perm[n // 2:]
    cal_conf = confidences(logits[:, cal_idx])
    test_logits, test_labels = logits[:, test_idx], labels[test_idx]
    test_batches = [to_input(torch.stack([val_set[int(i)][0] for i in test_idx[s:s + args.eval_batch_size]]), device)
                    for s in range(0, len(test_idx), args.eval_batch_size)]
    n_test = len(test_idx)

    runners = {p: EarlyExitRunner(net, thresholds_from_confidences(cal_conf, exit_prior(p, num_exits)))
               for p in priors}
    net.eval()
    cum = next(iter(runners.values())).cumulative_macs(input_size).double()
    total_macs = float(cum[-1])

    # One real run per prior: accuracy, executed MACs, exits (and a check against the simulated evaluation).
    results = {}
    with torch.inference_mode():
        for p, runner in progress(runners.items(), show, desc="budgeted", leave=False):
            outs = [runner(b) for b in test_batches]
            preds = torch.cat([o.predictions for o in outs])
            exits = torch.cat([o.exits for o in outs])
            macs = torch.cat([o.macs for o in outs]).double()
            sim_exits, sim_preds = simulate_exits(test_logits, runner.thresholds)
            results[p] = {"acc": float((preds == test_labels).double().mean()), "macs": float(macs.mean()),
                          "hist": torch.bincount(exits, minlength=num_exits).tolist(),
                          "sim_agree": float(((sim_preds == preds) & (sim_exits == exits)).double().mean())}

    # Wall-clock: every candidate runs the whole test half, interleaved, median of --timing-reps rounds.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            for b in test_batches:
                fn(b)
            sync()
        return run

    cands = {"all exits": timed(net)}
    cands.update({f"p={p:g}": timed(r) for p, r in runners.items()})
    any_runner = runners[priors[0]]
    cands.update({f"exit {k + 1}": timed(lambda b, k=k: any_runner.anytime(b, exit=k)) for k in range(num_exits)})
    ms = interleaved_medians(cands, reps=args.timing_reps, warmup=1)
    per_img = {name: t / n_test for name, t in ms.items()}
    all_ms = per_img["all exits"]

    # 1. Anytime table.
    acc = per_exit_accuracy(logits, labels)
    acc_test = per_exit_accuracy(test_logits, test_labels)  # the budgeted runs' images, for the plot
    anytime = [{"exit": k + 1, "accuracy": float(acc[k]), "accuracy_test_half": float(acc_test[k]),
                "macs_M": float(cum[k]) / 1e6,
                "macs_fraction": float(cum[k]) / total_macs, "latency_ms_per_image": per_img[f"exit {k + 1}"]}
               for k in range(num_exits)]
    write_csv(os.path.join(args.out, "anytime.csv"), anytime)
    print(f"\nanytime prediction ({n} validation images, {input_size[1]}x{input_size[2]}; latency on the "
          f"{n_test}-image test half in batches of {args.eval_batch_size}):")
    print("  exit  accuracy  MACs/image (M)  of total  latency/image (ms)")
    for r in anytime:
        print(f"  {r['exit']:4d}  {r['accuracy']:8.3f}  {r['macs_M']:14.2f}  {r['macs_fraction']:8.2f}  "
              f"{r['latency_ms_per_image']:18.3f}")

    # 2. Budgeted batches.
    budgeted = []
    for p in priors:
        r = results[p]
        budgeted.append({"prior": p, "accuracy": r["acc"], "avg_macs_M": r["macs"] / 1e6,
                         "macs_fraction": r["macs"] / total_macs, "ideal_speedup": total_macs / r["macs"],
                         "latency_ms_per_image": per_img[f"p={p:g}"], "all_exits_ms_per_image": all_ms,
                         "speedup": all_ms / per_img[f"p={p:g}"], "sim_agree": r["sim_agree"],
                         "exit_histogram": " ".join(str(c) for c in r["hist"])})
    write_csv(os.path.join(args.out, "budgeted.csv"), budgeted)
    print(f"\nbudgeted batches (thresholds calibrated on {len(cal_idx)} images, run on the other {n_test}; "
          f"all exits: {total_macs / 1e6:.2f}M MACs, {all_ms:.3f} ms per image):")
    print("  prior  accuracy  avg MACs (M)  of total  ms/image  speedup (ideal)  exits")
    for r in budgeted:
        print(f"  {r['prior']:5g}  {r['accuracy']:8.3f}  {r['avg_macs_M']:12.2f}  {r['macs_fraction']:8.2f}  "
              f"{r['latency_ms_per_image']:8.3f}  {r['speedup']:6.2f} ({r['ideal_speedup']:5.2f})  "
              f"{r['exit_histogram']}")

    # 3. Exit histogram at --prior.
    hist = results[args.prior]["hist"]
    print(f"\nexit histogram at p={args.prior:g} ({n_test} test images, accuracy {results[args.prior]['acc']:.3f}):")
    print(bar_chart(hist, [f"exit {k + 1:2d} ({float(cum[k]) / 1e6:7.2f}M MACs)" for k in range(num_exits)]))

    plot(args, anytime, budgeted, hist, all_ms, total_macs)
    return anytime, budgeted


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(args, anytime, budgeted, hist, all_ms, total_macs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("budgeted.png and exit_histogram.png skipped: matplotlib is not installed")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((a, "macs", "average MACs per image (M)"),
                           (b, "latency", "measured latency per image (ms)")):
        xa = [r["macs_M"] if key == "macs" else r["latency_ms_per_image"] for r in anytime]
        xb = [r["avg_macs_M"] if key == "macs" else r["latency_ms_per_image"] for r in budgeted]
        ax.plot(xa, [r["accuracy_test_half"] for r in anytime], "s--", color="gray",
                label="anytime (stop all at exit k)")
        ax.plot(xb, [r["accuracy"] for r in budgeted], "o-", label="budgeted batch (priors p)")
        for r, x in zip(budgeted, xb):
            ax.annotate(f"{r['prior']:g}", (x, r["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.axvline(total_macs / 1e6 if key == "macs" else all_ms, color="red", lw=0.8, ls=":", label="all exits")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8, loc="lower right")
    a.set_title(f"{args.model} on {args.data.split(':')[0]}: accuracy vs MACs")
    b.set_title("accuracy vs wall-clock (EarlyExitRunner), test half")
    fig.text(0.5, 0.005, machine_description(), ha="center", fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(os.path.join(args.out, "budgeted.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(1, len(hist) + 1), hist)
    ax.set_xlabel("exit")
    ax.set_ylabel("test images")
    ax.set_xticks(range(1, len(hist) + 1))
    ax.set_title(f"where samples leave at p={args.prior:g}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "exit_histogram.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="msdnet_cifar", choices=MODELS)
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=0, help="at most this many steps per epoch (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine per step, or step: /10 at 50%% and 75%% of training (MSDNet)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/early_exit")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate OUT/checkpoint.pt")
    p.add_argument("--priors", default=DEFAULT_PRIORS, help="priors p of the budgeted-batch sweep (q_k ~ p^k)")
    p.add_argument("--prior", type=float, default=1.0, help="prior whose exit histogram is shown")
    p.add_argument("--eval-batch-size", type=int, default=64, help="batch size of validation and budgeted runs")
    p.add_argument("--eval-samples", type=int, default=0, help="use only the first N validation images (0: all)")
    p.add_argument("--timing-reps", type=int, default=5, help="timed rounds per candidate (median)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: one GPU per process when there are enough GPUs, else CPU")
    args = p.parse_args(argv)
    args.priors = parse_priors(args.priors)
    if not args.prior > 0:
        raise SystemExit(f"--prior must be > 0, got {args.prior}")
    for name in ("epochs", "batch_size", "eval_batch_size", "timing_reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    device, distributed, rank, world = setup_process(args.device, args.threads, args.seed)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if (args.resume or args.eval_only) and not os.path.exists(ckpt_path):
        raise SystemExit(f"--resume/--eval-only: {ckpt_path} not found")
    train_set, val_set, classes = load_data(args.data, args.seed)
    show = not args.no_progress and rank == 0
    os.makedirs(args.out, exist_ok=True)

    net = getattr(models, args.model)(num_classes=classes)
    image_size = tuple(val_set[0][0].shape)
    if image_size[1:] != tuple(net.input_size)[1:]:
        raise SystemExit(f"--model {args.model} takes {net.input_size[1]}x{net.input_size[2]} images, --data "
                         f"{args.data} gives {image_size[1]}x{image_size[2]} (use a *_cifar model for 32x32 data, "
                         f"*_imagenet for imagefolder)")
    net = net.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                          nesterov=True)
    start_epoch = 0
    if args.resume or args.eval_only:
        ckpt = torch.load(ckpt_path, map_location=device)
        if ckpt.get("args", {}).get("model", args.model) != args.model:
            raise SystemExit(f"{ckpt_path} holds a {ckpt['args']['model']}, not a {args.model} (--model)")
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) if distributed else None
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True)
    if len(train_loader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size}: larger than the training set per process")
    val_subset = Subset(val_set, range(min(args.eval_samples, len(val_set)))) if args.eval_samples else val_set
    val_loader = DataLoader(val_subset, args.eval_batch_size)
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    steps_per_epoch = min(len(train_loader), args.steps) if args.steps else len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    num_exits = net.num_exits

    log_path = os.path.join(args.out, "log.csv")
    fields = ["epoch", "lr", "train_loss", "train_loss_last_exit", "train_acc_last_exit", "val_acc_first",
              "val_acc_last", "val_acc_best", "best_exit", "val_acc_mean", "val_acc_per_exit", "epoch_time_s"]
    if rank == 0 and not args.eval_only and (not os.path.exists(log_path) or not args.resume):
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
    if rank == 0:
        print(f"{args.model}: {num_exits} exits, {sum(q.numel() for q in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_set)} training / {len(val_set)} validation images, {classes} classes, device {device}"
              + (f", {world} processes" if distributed else ""), flush=True)

    epochs = range(start_epoch, start_epoch) if args.eval_only else range(start_epoch, args.epochs)
    for epoch in epochs:
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        tot = last_tot = correct = seen = 0.0
        lr = args.lr
        step = -1
        it = progress(train_loader, show, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch)
        for step, (x, y) in enumerate(it):
            if step >= steps_per_epoch:
                break
            lr = args.lr * lr_factor(args.lr_schedule, (epoch * steps_per_epoch + step) / total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x = augment(x.to(device)).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            outs = model(x)
            losses = [F.cross_entropy(o, y) for o in outs]
            loss = sum(losses)  # equal weights, as in MSDNet / RANet
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, last_tot = tot + loss.item(), last_tot + losses[-1].item()
            correct += (outs[-1].argmax(1) == y).sum().item()
            seen += y.numel()
            if show and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss.item():.3f}", last=f"{losses[-1].item():.3f}", lr=f"{lr:.4f}")
        n = max(1, min(steps_per_epoch, step + 1))
        if rank == 0:
            logits, labels = all_exit_logits(net, val_loader, device, show)
            acc = per_exit_accuracy(logits, labels)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": tot / n, "train_loss_last_exit": last_tot / n,
                   "train_acc_last_exit": correct / max(seen, 1), "val_acc_first": float(acc[0]),
                   "val_acc_last": float(acc[-1]), "val_acc_best": float(acc.max()),
                   "best_exit": int(acc.argmax()) + 1, "val_acc_mean": float(acc.mean()),
                   "val_acc_per_exit": " ".join(f"{a:.4f}" for a in acc.tolist()),
                   "epoch_time_s": time.perf_counter() - t0}
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, fields).writerow(row)
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                        "args": vars(args)}, ckpt_path)
            print(f"epoch {epoch + 1}: loss {row['train_loss']:.3f} (summed over {num_exits} exits; last exit "
                  f"{row['train_loss_last_exit']:.3f}), val acc exit 1 {row['val_acc_first']:.3f}, "
                  f"last {row['val_acc_last']:.3f}, best {row['val_acc_best']:.3f} (exit {row['best_exit']}), "
                  f"{row['epoch_time_s']:.1f} s", flush=True)
    if rank == 0:
        evaluate(net, val_set, args, device, show)
        print(f"\nwritten to {args.out}: anytime.csv, budgeted.csv, budgeted.png, exit_histogram.png"
              + ("" if args.eval_only else ", log.csv, checkpoint.pt"), flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
