"""The contract between early-exit networks (MSDNet, RANet) and the early-exit runtime.

A network is run in stages, one per exit, so a runtime can drop the samples that have exited after every
classifier and compute only what the remaining classifiers need:

    state = net.begin(x)                   # stem (first layer); counted in exit 0's MACs
    for k in range(net.num_exits):
        state, logits = net.step(state, k)  # the layers exit k needs beyond `state`, then classifier k
        state = net.keep(state, index)      # continue with a subset of the samples (batch shrinks)

``forward(x)`` is exactly these stages over the whole batch and returns every exit's logits (a list), so the
simulated evaluation (all exits, thresholds replayed) and the runtime compute the same numbers per sample.

``fused``: in eval mode the networks write every concat through :func:`dynconv_ext.ops.conv2d_into` /
:func:`dynconv_ext.ops.resize_into` into preallocated channels-last buffers (BN folded into the convs);
``fused=False`` (and training) runs the official structure with ``torch.cat``.
"""
from typing import Any, List, Sequence

import torch
from torch import nn

from ..profile.macs import LayerMacs


def index_state(state: Any, index: torch.Tensor) -> Any:
    """``state`` with every tensor restricted to the samples ``index`` (dim 0); lists, tuples and dicts are
    walked; other values are kept. 4-D tensors keep their memory format (channels-last buffers stay so)."""
    if isinstance(state, torch.Tensor):
        if state.dim() == 0:
            return state
        picked = state[index]
        if state.dim() == 4 and state.is_contiguous(memory_format=torch.channels_last) and not state.is_contiguous():
            picked = picked.contiguous(memory_format=torch.channels_last)
        return picked
    if isinstance(state, (list, tuple)):
        return type(state)(index_state(s, index) for s in state)
    if isinstance(state, dict):
        return {k: index_state(v, index) for k, v in state.items()}
    return state


class EarlyExitNet(nn.Module):
    """Base of the early-exit networks. Subclasses set ``num_exits`` and ``input_size`` (C, H, W) and implement
    ``begin`` and ``step``; ``keep``, ``forward`` and ``exit_macs`` come from here."""

    num_exits: int = 0
    input_size: Sequence[int] = (3, 32, 32)
    fused: bool = True

    def begin(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def step(self, state: Any, k: int):
        raise NotImplementedError

    def keep(self, state: Any, index: torch.Tensor) -> Any:
        return index_state(state, index)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        state = self.begin(x)
        outs = []
        for k in range(self.num_exits):
            state, logits = self.step(state, k)
            outs.append(logits)
        return outs

    @torch.no_grad()
    def exit_macs(self, input_size: Sequence[int] = None) -> List[int]:
        """Per-sample multiply-accumulates of each stage: entry k is what reaching exit k costs beyond exit k-1
        (the stem is in entry 0), counted layer by layer (every Conv2d and Linear) on the unfused path."""
        size = tuple(input_size or self.input_size)
        was_training, was_fused = self.training, self.fused
        try:
            self.eval()
            self.fused = False
            p = next(self.parameters())
            per_exit = []
            with LayerMacs(self) as counter:
                state = self.begin(torch.zeros((1,) + size, dtype=p.dtype, device=p.device))
                for k in range(self.num_exits):
                    state, _ = self.step(state, k)
                    per_exit.append(counter.total - sum(per_exit))
        finally:
            self.train(was_training)
            self.fused = was_fused
        return per_exit
