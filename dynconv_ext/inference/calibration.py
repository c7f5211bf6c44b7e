"""Threshold calibration of MSDNet's budgeted-batch ("dynamic") evaluation.

A sample leaves at the first exit k whose confidence (the largest softmax probability) reaches the threshold
T_k; the last exit takes everything left. Given a prior over exits, q_k proportional to p^k (k = 1..K: p < 1
favours early exits, p > 1 late ones), the thresholds are found on a validation set greedily, exit by exit:
among the samples still running, the floor(n * q_k) most confident at exit k leave, and T_k is the confidence
of the last of them (exits with floor(n * q_k) = 0 get T_k = +inf, the last exit -inf).
"""
import math
from typing import Iterable, List, Sequence, Union

import torch

from ..models.early_exit import EarlyExitNet


def exit_prior(p: float, num_exits: int) -> torch.Tensor:
    """q_k = p^k / sum_j p^j for k = 1..num_exits (MSDNet's geometric exit distribution)."""
    if not p > 0:
        raise ValueError(f"exit_prior: p must be > 0, got {p}")
    if num_exits < 1:
        raise ValueError(f"exit_prior: num_exits must be >= 1, got {num_exits}")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    q = torch.exp(math.log(p) * k)
    return q / q.sum()


def confidences(logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """[K, N] largest softmax probability of every exit's logits ([K, N, classes] or a list of [N, classes])."""
    if not isinstance(logits, torch.Tensor):
        logits = torch.stack(list(logits))
    return torch.softmax(logits.double(), dim=-1).amax(dim=-1)


def thresholds_from_confidences(conf: torch.Tensor, prior: Sequence[float]) -> torch.Tensor:
    """Thresholds T [K] from validation confidences ``conf`` [K, N] and exit proportions ``prior`` [K]."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    q = torch.as_tensor(prior, dtype=torch.float64)
    if conf.dim() != 2 or q.dim() != 1 or q.numel() != conf.shape[0]:
        raise ValueError(f"thresholds_from_confidences: conf must be [K, N] and prior [K], got "
                         f"{tuple(conf.shape)} and {tuple(q.shape)}")
    if (q < 0).any():
        raise ValueError("thresholds_from_confidences: prior must be non-negative")
    num_exits, n = conf.shape
    thresholds = torch.full((num_exits,), math.inf, dtype=torch.float64)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(num_exits - 1):
        take = int(math.floor(n * float(q[k] / q.sum())))
        candidates = conf[k][running]
        if take > 0 and candidates.numel() > 0:
            take = min(take, candidates.numel())
            thresholds[k] = torch.topk(candidates, take).values[-1]
        running &= conf[k] < thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


@torch.no_grad()
def collect_logits(net: EarlyExitNet, data: Iterable, progress: bool = False):
    """Every exit's logits on ``data`` (a DataLoader of (images, labels), or a list of such pairs, or a
    tensor of images): returns ([K, N, classes] logits, labels or None)."""
    net.eval()
    if isinstance(data, torch.Tensor):
        data = [(data, None)]
    if progress:
        try:  # tqdm is optional (the bench/test extras), not a dependency of the package
            from tqdm.auto import tqdm
            data = tqdm(data, desc="calibration logits", leave=False)
        except ImportError:
            pass
    outs, labels = [], []
    p = next(net.parameters())
    for batch in data:
        images, target = batch if isinstance(batch, (list, tuple)) else (batch, None)
        outs.append(torch.stack(net(images.to(device=p.device, dtype=p.dtype))).cpu())
        if target is not None:
            labels.append(torch.as_tensor(target))
    return torch.cat(outs, dim=1), (torch.cat(labels) if labels else None)


def calibrate_thresholds(net: EarlyExitNet, data, prior: Union[float, Sequence[float]], progress: bool = False
                         ) -> torch.Tensor:
    """MSDNet's budgeted-batch threshold search on validation ``data``.

    Args:
        net: an :class:`~dynconv_ext.models.early_exit.EarlyExitNet`.
        data: images tensor, or an iterable of (images, labels) batches (e.g. a DataLoader).
        prior: ``p`` of the geometric prior q_k ∝ p^k, or the exit proportions [K] themselves.
    Returns:
        thresholds [K] (float64) for :class:`EarlyExitRunner`.
    """
    q = exit_prior(float(prior), net.num_exits) if isinstance(prior, (int, float)) else prior
    logits, _ = collect_logits(net, data, progress)
    return thresholds_from_confidences(confidences(logits), q)


def simulate_exits(logits, thresholds) -> List[torch.Tensor]:
    """The simulated evaluation (every exit computed, thresholds replayed, as the official code does):
    returns (exit index [N], prediction [N]) of every sample."""
    if not isinstance(logits, torch.Tensor):
        logits = torch.stack(list(logits))
    conf = confidences(logits)
    t = torch.as_tensor(thresholds, dtype=torch.float64).unsqueeze(1)
    passes = conf >= t
    passes[-1] = True
    exit_idx = passes.to(torch.int8).argmax(dim=0)  # first exit that accepts
    preds = logits.argmax(dim=-1).gather(0, exit_idx.long().unsqueeze(0))[0]
    return exit_idx.long(), preds
