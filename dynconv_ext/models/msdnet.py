"""MSDNet (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018) on
the early-exit contract of :mod:`dynconv_ext.models.early_exit`.

Architecture (the configurations of the official PyTorch code, kalviny/MSDNet-PyTorch, rewritten here)
-------------------------------------------------------------------------------------------------------
``S = len(grFactor)`` scales; a feature map at scale ``s`` has ``n * grFactor[s]`` channels, where ``n`` is the
network's running "base" channel count (``nChannels`` after the first layer, ``+ growthRate`` per layer, ``x
reduction`` at a transition).

* First layer: scale 0 is a 3x3 conv-BN-ReLU (CIFAR) or a 7x7/2 conv (with bias) -BN-ReLU + 3x3/2 max pool
  (ImageNet); every coarser scale is a 3x3/2 conv-BN-ReLU of the previous scale.
* Layer ``l`` (``1..L``, ``L = base + sum of the later steps``) keeps the scales ``offset..S-1``. At scale ``s`` it
  concatenates onto its input ``x_s``: a "down" unit of the finer scale ``x_{s-1}`` (1x1 bottleneck conv-BN-ReLU
  to ``min(C_in, bnFactor[s-1] * g/2)`` channels, then 3x3/2 conv-BN-ReLU to ``g/2``) and a "normal" unit of
  ``x_s`` (1x1 bottleneck to ``min(C_in, bnFactor[s] * g/2)``, 3x3 conv-BN-ReLU to ``g/2``):
  ``cat(x_s, down(x_{s-1}), normal(x_s))`` with ``g = growthRate * grFactor[s]``. The finest kept scale has no
  down unit (``cat(x_s, normal(x_s))`` with a normal unit of width ``g``, bottleneck ``min(C_in, bnFactor[s] * g)``)
  except at a layer that drops a scale.
* ``prune="max"``: with ``interval = ceil(L / S)``, layer ``l`` reads ``S - floor(max(0, l-2) / interval)`` scales
  and writes ``S - floor((l-1) / interval)``; where it drops one, a transition follows (per kept scale a 1x1
  conv-BN-ReLU to ``floor(reduction * n)`` base channels). ``prune="min"`` (drop scales only at the end, transitions
  after layers ``floor(L/3)`` and ``floor(2L/3)``) is built as the official code does but is not one of the
  published configurations.
* Block ``k`` is ``steps[k]`` layers (``steps = [base] + [step] * (nBlocks-1)`` for ``stepmode="even"``,
  ``[base] + [step * i + 1 for i in 1..nBlocks-1]`` for ``"lin_grow"``); classifier ``k`` follows it and reads the
  coarsest scale: CIFAR: two 3x3/2 conv-BN-ReLU of 128 channels, 2x2 average pool, Linear(128); ImageNet: the
  same with ``C`` channels (the coarsest scale's width), Linear(C).
* Initialization: PyTorch's defaults (the official ``_init_weights`` is only ever handed container modules, so the
  official model keeps PyTorch's defaults too).

Configurations (``msdnet_*`` factories; values from the official ``args.py``, ``README.md`` and run scripts):

==========================  =======  ========  ====  ====  =========  ===  ========  ========  ======  =========
factory                     nBlocks  stepmode  step  base  nChannels  gR   grFactor  bnFactor  prune   reduction
==========================  =======  ========  ====  ====  =========  ===  ========  ========  ======  =========
msdnet_cifar (anytime)      10 (*)   even      2     4     16         6    1-2-4     1-2-4     max     0.5
msdnet_cifar_budgeted       5        lin_grow  1     1     16         6    1-2-4     1-2-4     max     0.5
msdnet_imagenet(step=4)     5        even      4     4     32         16   1-2-4-4   1-2-4-4   max     0.5
msdnet_imagenet(step=7)     5        even      7     7     32         16   1-2-4-4   1-2-4-4   max     0.5
==========================  =======  ========  ====  ====  =========  ===  ========  ========  ======  =========

(*) ``run_anytime_cifar.sh`` uses 10 blocks, the README's anytime command 7 (``msdnet_cifar(nBlocks=7)``). The
budgeted CIFAR command of the README uses 5 blocks (``run_budget_cifar.sh`` 8: ``msdnet_cifar_budgeted(nBlocks=8)``).
Bottlenecks are on in all of them (``--bottleneck`` defaults to True).

Staged execution (lazy evaluation)
----------------------------------
``begin(x)`` runs the first layer. ``step(state, k)`` computes only the features classifier ``k`` depends on:
classifier ``k`` reads the coarsest scale after layer ``L_k``, which depends on scales ``S-2..S-1`` after layer
``L_k - 1``, and so on, so the finer scales of a block's last layers are deferred to the next step (lazy
evaluation: a sample that exits at ``k`` never pays for them). Units run layer by layer, coarse scale first
within a layer (so a down unit always reads its finer input at the previous layer), a transition right after its
scale's unit. ``forward`` (all exits) therefore computes every unit exactly once, as the official model does;
``exit_macs()[k]`` is what stage ``k`` costs under this schedule (summing to the official total for the
published ``prune="max"`` configurations; under ``prune="min"`` the finer scales of the last layers, which no
classifier reads, are never computed at all).

Fused inference path (``fused=True`` in eval, the default)
-----------------------------------------------------------
BN is folded into each conv (cached; the cache is rebuilt after ``train()``, ``load_state_dict`` or any in-place
change of a parameter or buffer). Each scale keeps one preallocated channels-last buffer with room for every
channel until its next transition (or its last layer); the filled prefix ``buf[:, :c]`` is that scale's features.
A unit's 1x1 bottleneck writes into a scratch buffer, and its 3x3 conv writes its ``g/2`` (or ``g``) new channels
with :func:`dynconv_ext.ops.conv2d_into` at the next channel offset of the scale's buffer, so each concat costs
nothing; a transition writes into the next buffer of its scale. No ``torch.cat`` on this path. The state between
stages is ``{"feats": [buffer or None per scale], "filled": [channels per scale], "exit": last exit done,
"fused": bool}`` (buffers no later unit reads are released), which ``keep`` restricts to a subset of samples.
``fused=False`` or training runs the official structure (``nn.Conv2d``/``BatchNorm2d``/``ReLU`` and ``torch.cat``)
with the same parameters and schedule, and so does an eval forward whose input requires grad (conv2d_into's
backward keeps views of the buffers that later layers append to); the fused path is for inference (its folded
weights are constants).
"""
import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.blocks import fold_bn
from ..ops.masked_conv2d import ACTIVATIONS
from ..ops.conv2d_into import conv2d_into_unchecked, mark_constant_weight
from .early_exit import EarlyExitNet, signature_changed, weights_signature

__all__ = ["MSDNet", "msdnet_cifar", "msdnet_cifar_budgeted", "msdnet_imagenet"]


class ConvBNReLU(nn.Module):
    """conv -> BN -> ReLU (the official ``ConvBasic``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DenseUnit(nn.Module):
    """MSDNet's growth unit (the official ``ConvBN``): optional 1x1 bottleneck conv-BN-ReLU to
    ``min(c_in, bn_factor * c_out)`` channels, then a 3x3 conv-BN-ReLU (stride 1 "normal", stride 2 "down")."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_factor: int):
        super().__init__()
        inner = c_in
        self.reduce: Optional[ConvBNReLU] = None
        if bottleneck:
            inner = min(c_in, bn_factor * c_out)
            self.reduce = ConvBNReLU(c_in, inner, 1)
        self.conv = ConvBNReLU(inner, c_out, 3, stride, 1)
        self.stride = stride

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        return self.conv(x)


class ScaleUnit(nn.Module):
    """One scale of one MSDN layer: ``cat(x_s, down(x_{s-1}), normal(x_s))`` (``down`` may be None)."""

    def __init__(self, down: Optional[DenseUnit], normal: DenseUnit):
        super().__init__()
        self.down = down
        self.normal = normal

    def forward(self, finer: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        parts = [x]
        if self.down is not None:
            parts.append(self.down(finer))
        parts.append(self.normal(x))
        return torch.cat(parts, dim=1)


class MSDNLayer(nn.Module):
    """The units of one layer (``units[i]`` is scale ``offset + i``) and its transition (empty, or one 1x1
    conv-BN-ReLU per kept scale)."""

    def __init__(self, offset: int, units: Sequence[ScaleUnit], transition: Sequence[ConvBNReLU]):
        super().__init__()
        self.offset = offset
        self.units = nn.ModuleList(units)
        self.transition = nn.ModuleList(transition)


class Classifier(nn.Module):
    """Two 3x3/2 conv-BN-ReLU, 2x2 average pool, flatten, Linear."""

    def __init__(self, c_in: int, c_mid: int, num_classes: int):
        super().__init__()
        self.conv1 = ConvBNReLU(c_in, c_mid, 3, 2, 1)
        self.conv2 = ConvBNReLU(c_mid, c_mid, 3, 2, 1)
        self.pool = nn.AvgPool2d(2)
        self.linear = nn.Linear(c_mid, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        return self.linear(x.flatten(1))


@dataclass(frozen=True)
class _LayerPlan:
    in_scales: int
    out_scales: int
    offset: int       # first scale written
    discard: bool     # drops a scale (its first kept scale then has a down unit)
    n_in: int         # base channels entering the layer
    n_grown: int      # after the layer's growth
    n_out: int        # after the transition (== n_grown without one)
    transition: bool

    def has_down(self, s: int) -> bool:
        return s > self.offset or self.discard


def _memo(fn):
    """Caches a schedule method's result per instance (the plan never changes after construction)."""
    def wrapper(self, *args):
        key = (fn.__name__,) + args
        memo = self.__dict__.setdefault("_schedule_memo", {})
        if key not in memo:
            memo[key] = fn(self, *args)
        return memo[key]
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _invalidate_fold_cache(module, incompatible_keys=None):
    module._fold_cache = None


class MSDNet(EarlyExitNet):
    """MSDNet with one exit per block; see the module docstring for the structure and the two paths.

    Args mirror the official command-line options: ``n_blocks``, ``step``, ``base``, ``stepmode`` (``"even"`` or
    ``"lin_grow"``), ``n_channels``, ``growth_rate``, ``gr_factor``, ``bn_factor``, ``prune`` (``"max"`` or
    ``"min"``), ``reduction``, ``bottleneck``; ``data`` is ``"cifar"`` (32x32 input) or ``"imagenet"`` (224x224).
    """

    def __init__(self, num_classes: int = 100, *, data: str = "cifar", n_blocks: int = 10, step: int = 2,
                 base: int = 4, stepmode: str = "even", n_channels: int = 16, growth_rate: int = 6,
                 gr_factor: Sequence[int] = (1, 2, 4), bn_factor: Sequence[int] = (1, 2, 4), prune: str = "max",
                 reduction: float = 0.5, bottleneck: bool = True, fused: bool = True):
        super().__init__()
        if data not in ("cifar", "imagenet"):
            raise ValueError(f"MSDNet: data must be 'cifar' or 'imagenet', got {data!r}")
        if stepmode not in ("even", "lin_grow"):
            raise ValueError(f"MSDNet: stepmode must be 'even' or 'lin_grow', got {stepmode!r}")
        if prune not in ("max", "min"):
            raise ValueError(f"MSDNet: prune must be 'max' or 'min', got {prune!r}")
        if n_blocks < 1 or base < 1 or step < 1:
            raise ValueError(f"MSDNet: n_blocks, base and step must be >= 1, got {n_blocks}, {base}, {step}")
        if len(bn_factor) != len(gr_factor):
            raise ValueError(f"MSDNet: bn_factor ({len(bn_factor)}) and gr_factor ({len(gr_factor)}) must have one "
                             "entry per scale")
        self.data, self.fused = data, fused
        self.gr_factor, self.bn_factor = tuple(gr_factor), tuple(bn_factor)
        self.growth_rate, self.n_channels = growth_rate, n_channels
        self.num_scales = S = len(gr_factor)
        self.num_exits = n_blocks
        self.input_size = (3, 32, 32) if data == "cifar" else (3, 224, 224)
        self.steps = [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, n_blocks)]
        L = sum(self.steps)

        # the layer plan (the official _build_block's arithmetic)
        plans: List[_LayerPlan] = []
        self.exit_layers: List[int] = []
        n, l = n_channels, 0
        for st in self.steps:
            for _ in range(st):
                l += 1
                if prune == "max":
                    interval = -(-L // S)
                    in_s = S - max(0, l - 2) // interval
                    out_s = S - (l - 1) // interval
                    trans = reduction > 0 and in_s > out_s
                else:
                    in_s, out_s = min(S, L - l + 2), min(S, L - l + 1)
                    trans = reduction > 0 and l in (math.floor(L / 3), math.floor(2 * L / 3))
                grown = n + growth_rate
                n_out = math.floor(reduction * grown) if trans else grown
                plans.append(_LayerPlan(in_s, out_s, S - out_s, in_s > out_s, n, grown, n_out, trans))
                n = n_out
            self.exit_layers.append(l)
        self.plans: Tuple[_LayerPlan, ...] = tuple(plans)

        # modules
        g0 = gr_factor[0]
        if data == "cifar":
            stem = [ConvBNReLU(3, n_channels * g0, 3, 1, 1)]
            self.stem_pool = None
        else:
            stem = [ConvBNReLU(3, n_channels * g0, 7, 2, 3, bias=True)]
            self.stem_pool = nn.MaxPool2d(3, 2, 1)
        for s in range(1, S):
            stem.append(ConvBNReLU(n_channels * gr_factor[s - 1], n_channels * gr_factor[s], 3, 2, 1))
        self.stem = nn.ModuleList(stem)
        layers = []
        for p in plans:
            units = []
            for s in range(p.offset, S):
                g = growth_rate * gr_factor[s]
                if p.has_down(s):
                    if g % 2:
                        raise ValueError(f"MSDNet: growth_rate * gr_factor[{s}] = {g} must be even (split between "
                                         "the down and the normal unit)")
                    down = DenseUnit(p.n_in * gr_factor[s - 1], g // 2, 2, bottleneck, bn_factor[s - 1])
                    normal = DenseUnit(p.n_in * gr_factor[s], g // 2, 1, bottleneck, bn_factor[s])
                else:
                    down, normal = None, DenseUnit(p.n_in * gr_factor[s], g, 1, bottleneck, bn_factor[s])
                units.append(ScaleUnit(down, normal))
            trans = [ConvBNReLU(p.n_grown * gr_factor[s], p.n_out * gr_factor[s], 1)
                     for s in range(p.offset, S)] if p.transition else []
            layers.append(MSDNLayer(p.offset, units, trans))
        self.layers = nn.ModuleList(layers)
        classifiers = []
        for L_k in self.exit_layers:
            c = plans[L_k - 1].n_out * gr_factor[-1]
            classifiers.append(Classifier(c, 128 if data == "cifar" else c, num_classes))
        self.classifiers = nn.ModuleList(classifiers)

        # widest bottleneck whose output lies at each scale (its scratch buffer)
        self._scratch_width = [0] * S
        for layer in self.layers:
            for i, unit in enumerate(layer.units):
                s = layer.offset + i
                for du, at in ((unit.down, s - 1), (unit.normal, s)):
                    if du is not None and du.reduce is not None:
                        self._scratch_width[at] = max(self._scratch_width[at], du.reduce.out_channels)
        self._fold_cache = None
        self.register_load_state_dict_post_hook(_invalidate_fold_cache)

    # ------------------------------------------------------------------ schedule (pure Python, cached)

    def _channels(self, l: int, s: int) -> int:
        """Channels of scale s after layer l (l = 0: the first layer), transition included."""
        return (self.n_channels if l == 0 else self.plans[l - 1].n_out) * self.gr_factor[s]

    @_memo
    def _needed(self, k: int) -> Dict[int, frozenset]:
        """Scales of each layer 1..L_k that classifier k depends on (an interval ending at the coarsest scale)."""
        L_k = self.exit_layers[k]
        need = {L_k: {self.num_scales - 1}}
        for l in range(L_k, 1, -1):
            prev = set()
            for s in need[l]:
                prev.add(s)
                if self.plans[l - 1].has_down(s):
                    prev.add(s - 1)
            need[l - 1] = prev
        return {l: frozenset(v) for l, v in need.items()}

    @_memo
    def _work(self, done: int, k: int) -> Tuple[Tuple[int, int], ...]:
        """(layer, scale) units computed by step k after exit `done` (-1: after begin), in execution order."""
        need, have = self._needed(k), (self._needed(done) if done >= 0 else {})
        return tuple((l, s) for l in range(1, self.exit_layers[k] + 1)
                     for s in sorted(need[l] - have.get(l, frozenset()), reverse=True))

    @_memo
    def _live(self, k: int) -> frozenset:
        """Scales whose features a later step still reads once exit k is done."""
        if k == self.num_exits - 1:
            return frozenset()
        live = {self.num_scales - 1}
        for l, s in self._work(k, self.num_exits - 1):
            live.add(s)
            if self.plans[l - 1].has_down(s):
                live.add(s - 1)
        return frozenset(live)

    @_memo
    def _capacity(self, l0: int, s: int) -> int:
        """Channels a buffer of scale s started after layer l0 must hold: up to its next transition / last layer."""
        cap, l = self._channels(l0, s), l0 + 1
        while l <= len(self.plans) and s >= self.plans[l - 1].offset:
            cap = self.plans[l - 1].n_grown * self.gr_factor[s]
            if self.plans[l - 1].transition:
                break
            l += 1
        return cap

    # ------------------------------------------------------------------ folded weights

    def train(self, mode: bool = True):
        self._fold_cache = None
        return super().train(mode)

    @torch.no_grad()
    def _folded(self, check: bool = True) -> Dict[nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
        """Folded (weight, bias) of every ConvBNReLU. ``check``: rebuild if a parameter or buffer was changed in
        place (version counter) or converted (data pointer) since the cache was built (``begin`` checks; ``step``
        reuses what ``begin`` validated)."""
        cache = self._fold_cache
        if cache is not None and not check:
            return cache[2]
        tensors = cache[0] if cache is not None else list(chain(self.parameters(), self.buffers()))
        sig = weights_signature(tensors)
        if signature_changed(None if cache is None else cache[1], sig):
            folded = {}
            # outside inference_mode, so the folded weights are normal tensors with a version counter, which the
            # kernels' packed-weight cache needs (they are then marked constant: nothing modifies them)
            with torch.inference_mode(False), torch.no_grad():  # (in this order: the first re-enables grad)
                for m in self.modules():
                    if isinstance(m, ConvBNReLU):
                        w, b = fold_bn(m.conv, m.bn)
                        folded[m] = (mark_constant_weight(w.contiguous()), b.contiguous())
            cache = self._fold_cache = (tensors, sig, folded)
        return cache[2]

    # ------------------------------------------------------------------ the contract

    def _use_fused(self, x: torch.Tensor) -> bool:
        """Fused in eval unless autograd must record through the input: conv2d_into's backward saves the prefix
        views it read, and later appends to the same buffer would invalidate them, so that case (e.g. input
        gradients of an eval model) runs the cat path."""
        return self.fused and not self.training and not (torch.is_grad_enabled() and x.requires_grad)

    def begin(self, x: torch.Tensor) -> Dict[str, Any]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MSDNet: input must be [N, 3, H, W], got {tuple(x.shape)}")
        S = self.num_scales
        feats: List[Optional[torch.Tensor]] = []
        fused = self._use_fused(x)
        if fused:
            fw = self._folded()
            first = self.stem[0]
            w, b = fw[first]
            c0 = first.out_channels
            if self.stem_pool is None:
                buf = self._pooled_empty(x, self._capacity(0, 0), x.shape[2], x.shape[3])
                _conv_into(x, w, b, buf, 0, 1, 1)
            else:
                h, wd = _conv_out(x.shape[2], 7, 2, 3), _conv_out(x.shape[3], 7, 2, 3)
                tmp = self._pooled_empty(x, c0, h, wd)
                _conv_into(x, w, b, tmp, 0, 2, 3)
                pooled = F.max_pool2d(tmp, 3, 2, 1)
                buf = self._pooled_empty(x, self._capacity(0, 0), pooled.shape[2], pooled.shape[3])
                buf[:, :c0].copy_(pooled)
            feats.append(buf)
            for s in range(1, S):
                w, b = fw[self.stem[s]]
                prev = feats[-1][:, :self._channels(0, s - 1)]
                buf = self._pooled_empty(x, self._capacity(0, s), _conv_out(prev.shape[2], 3, 2, 1),
                             _conv_out(prev.shape[3], 3, 2, 1))
                _conv_into(prev, w, b, buf, 0, 2, 1)
                feats.append(buf)
        else:
            y = self.stem[0](x)
            if self.stem_pool is not None:
                y = self.stem_pool(y)
            feats.append(y)
            for s in range(1, S):
                feats.append(self.stem[s](feats[-1]))
        return {"feats": feats, "filled": [self._channels(0, s) for s in range(S)], "exit": -1,
                "fused": fused}

    def step(self, state: Dict[str, Any], k: int):
        done = state["exit"]
        if not done < k < self.num_exits:
            raise ValueError(f"MSDNet.step: exit {k} must come after the state's last exit ({done}) and be < "
                             f"{self.num_exits}")
        feats, filled, fused = list(state["feats"]), list(state["filled"]), state["fused"]
        work = self._work(done, k)
        if fused:
            fw = self._folded(check=False)
            scratch: Dict[int, torch.Tensor] = {}
            for l, s in work:
                self._unit_fused(l, s, feats, filled, fw, scratch)
            logits = self._classify_fused(self.classifiers[k], feats[-1][:, :filled[-1]], fw)
        else:
            for l, s in work:
                self._unit_cat(l, s, feats, filled)
            logits = self.classifiers[k](feats[-1])
        live = self._live(k)
        feats = [f if s in live else None for s, f in enumerate(feats)]
        return {"feats": feats, "filled": filled, "exit": k, "fused": fused}, logits

    # ------------------------------------------------------------------ the two ways to run a unit

    def _unit_cat(self, l: int, s: int, feats: List, filled: List[int]) -> None:
        layer = self.layers[l - 1]
        unit = layer.units[s - layer.offset]
        y = unit(feats[s - 1] if unit.down is not None else None, feats[s])
        if layer.transition:
            y = layer.transition[s - layer.offset](y)
        feats[s], filled[s] = y, y.shape[1]

    def _unit_fused(self, l: int, s: int, feats: List, filled: List[int], fw, scratch: Dict[int, torch.Tensor]):
        layer = self.layers[l - 1]
        unit = layer.units[s - layer.offset]
        buf, c = feats[s], filled[s]
        x = buf[:, :c]
        off = c
        if unit.down is not None:
            finer = feats[s - 1][:, :filled[s - 1]]
            off = self._dense_into(unit.down, finer, s - 1, buf, off, fw, scratch)
        off = self._dense_into(unit.normal, x, s, buf, off, fw, scratch)
        if layer.transition:
            t = layer.transition[s - layer.offset]
            w, b = fw[t]
            new = self._pooled_empty(buf, self._capacity(l, s), buf.shape[2], buf.shape[3])
            _conv_into(buf[:, :off], w, b, new, 0, 1, 0)
            buf, off = new, t.out_channels
        feats[s], filled[s] = buf, off

    def _dense_into(self, du: DenseUnit, x: torch.Tensor, at: int, out: torch.Tensor, off: int, fw,
                    scratch: Dict[int, torch.Tensor]) -> int:
        """Runs a DenseUnit on x (scale `at`) writing its channels into out[:, off:]; returns the next offset."""
        if du.reduce is not None:
            w, b = fw[du.reduce]
            sc = scratch.get(at)
            if sc is None:
                sc = scratch[at] = self._pooled_empty(x, self._scratch_width[at], x.shape[2], x.shape[3])
            _conv_into(x, w, b, sc, 0, 1, 0)
            x = sc[:, :w.shape[0]]
        w, b = fw[du.conv]
        _conv_into(x, w, b, out, off, du.stride, 1)
        return off + w.shape[0]

    def _classify_fused(self, cls: Classifier, x: torch.Tensor, fw) -> torch.Tensor:
        for m in (cls.conv1, cls.conv2):
            w, b = fw[m]
            y = self._pooled_empty(x, w.shape[0], _conv_out(x.shape[2], 3, 2, 1), _conv_out(x.shape[3], 3, 2, 1))
            _conv_into(x, w, b, y, 0, 2, 1)
            x = y
        x = F.avg_pool2d(x, 2)
        return F.linear(x.flatten(1), cls.linear.weight, cls.linear.bias)


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _conv_into(x, w, b, out, off, stride, pad):
    if x.shape[0] == 0:  # nothing to compute for an empty batch
        return out
    # (the arguments are the model's own: no Python-side validation, ~170 conv calls a forward)
    return conv2d_into_unchecked(x, w, b, out, off, [stride, stride], [pad, pad], [1, 1], 1, _RELU)


_RELU = ACTIVATIONS["relu"]


def msdnet_cifar(num_classes: int = 100, *, nBlocks: int = 10, fused: bool = True) -> MSDNet:
    """MSDNet for CIFAR anytime prediction (official: nBlocks 10 in ``run_anytime_cifar.sh``, 7 in the README's
    command; step 2, stepmode even, base 4, nChannels 16, growthRate 6, grFactor/bnFactor 1-2-4, prune max,
    reduction 0.5, bottleneck)."""
    return MSDNet(num_classes, data="cifar", n_blocks=nBlocks, step=2, base=4, stepmode="even", n_channels=16,
                  growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), prune="max", reduction=0.5,
                  bottleneck=True, fused=fused)


def msdnet_cifar_budgeted(num_classes: int = 100, *, nBlocks: int = 5, fused: bool = True) -> MSDNet:
    """MSDNet for CIFAR budgeted batch classification (official README: nBlocks 5, stepmode lin_grow, step 1,
    base 1, nChannels 16; growthRate 6, grFactor/bnFactor 1-2-4, prune max, reduction 0.5, bottleneck)."""
    return MSDNet(num_classes, data="cifar", n_blocks=nBlocks, step=1, base=1, stepmode="lin_grow", n_channels=16,
                  growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), prune="max", reduction=0.5,
                  bottleneck=True, fused=fused)


def msdnet_imagenet(num_classes: int = 1000, step: int = 4, *, fused: bool = True) -> MSDNet:
    """MSDNet for ImageNet (official: nBlocks 5, stepmode even, step = base = 4 (README) or 7
    (``run_imagenet.sh``), nChannels 32, growthRate 16, grFactor/bnFactor 1-2-4-4, prune max, reduction 0.5)."""
    if step not in (4, 7):
        raise ValueError(f"msdnet_imagenet: the official configurations have step 4 or 7, got {step}")
    return MSDNet(num_classes, data="imagenet", n_blocks=5, step=step, base=step, stepmode="even", n_channels=32,
                  growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), prune="max", reduction=0.5,
                  bottleneck=True, fused=fused)
