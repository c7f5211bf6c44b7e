"""Data and process helpers shared by the example training programs (train_dynconv.py, train_early_exit.py).

Data sets (the ``--data`` argument of the programs):
  digits               built in, offline: scikit-learn's 8x8 digits, upscaled to 32x32 RGB (10 classes)
  cifar10:DIR          the CIFAR-10 python pickle batches in DIR (data_batch_1..5, test_batch); no download
  cifar100:DIR         the CIFAR-100 python pickles in DIR (train, test)
  imagefolder:DIR      DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, 224x224 crops

The programs run as scripts, so their folder is on sys.path and ``from example_data import ...`` works.
"""
import os
import pickle

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["MEAN", "STD", "load_digits", "load_cifar", "load_imagefolder", "load_data", "augment", "progress",
           "setup_process"]

MEAN, STD = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = (x - MEAN) / STD, y
    cut = int(0.8 * len(y))
    tr, va = perm[:cut], perm[cut:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), 10


def load_cifar(root: str, classes: int):
    def read(name):
        with open(os.path.join(root, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = torch.tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32).float() / 255.0
        y = torch.tensor(d[b"labels"] if b"labels" in d else d[b"fine_labels"], dtype=torch.long)
        return (x - MEAN) / STD, y
    if classes == 10:
        parts = [read(f"data_batch_{i}") for i in range(1, 6)]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        val = read("test_batch")
    else:
        train, val = read("train"), read("test")
    return TensorDataset(*train), TensorDataset(*val), classes


def load_imagefolder(root: str):
    from torchvision import datasets, transforms
    norm = transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist())
    train = datasets.ImageFolder(os.path.join(root, "train"), transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(os.path.join(root, "val"), transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm]))
    return train, val, len(train.classes)


def load_data(spec: str, seed: int):
    kind, _, path = spec.partition(":")
    if kind == "digits":
        return load_digits(seed)
    if kind in ("cifar10", "cifar100"):
        if not os.path.isdir(path):
            raise SystemExit(f"--data {spec}: folder {path!r} not found (it must hold the python pickle batches)")
        return load_cifar(path, 10 if kind == "cifar10" else 100)
    if kind == "imagefolder":
        if not os.path.isdir(os.path.join(path, "train")):
            raise SystemExit(f"--data {spec}: expected {path}/train and {path}/val class folders")
        return load_imagefolder(path)
    raise SystemExit(f"--data: unknown kind {kind!r} (digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR)")


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, on a batch of tensors (for the 32x32 data sets)."""
    if x.shape[-1] != 32:
        return x
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2,))
    x = padded[:, :, i:i + 32, j:j + 32]
    flip = torch.rand(n) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
        return tqdm(iterable, **kw)
    except ImportError:
        return iterable


def setup_process(device_arg: str, threads: int, seed: int):
    """Device, process group and seeds of one training process (plain run or one torchrun worker).

    `device_arg` "auto" uses one GPU per process when the node has enough GPUs, else the CPU (gloo);
    "cuda" insists on the GPUs. Returns (device, distributed, rank, world).
    """
    import torch.distributed as dist
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_procs
    if device_arg == "cuda" and not enough_gpus:
        raise SystemExit(f"--device cuda: {local_procs} process(es) per node need as many GPUs, "
                         f"found {torch.cuda.device_count()}")
    use_cuda = enough_gpus and device_arg != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed + rank)
    return device, distributed, rank, world
