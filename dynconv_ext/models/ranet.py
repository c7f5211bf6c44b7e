"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020) on the early-exit contract.

RANet runs one dense "scale flow" per resolution, lowest resolution first. The first flow (flow 0, the coarsest
features) has ``n_blocks`` dense blocks, each followed by a classifier. Every later flow is one resolution finer
(or the same, where ``scale_list`` repeats a scale) and has ``block_step`` more blocks; its first blocks are
*fusion* blocks that read the features of the coarser flow's block with the same index (upsampled and concatenated
into their own), the rest are plain dense blocks, each followed by a classifier. Easy samples exit at the
low-resolution classifiers and never pay for the high-resolution flows.

Structure (the layer ordering, channel numbers, strides, transitions, the module names in ``state_dict`` and the
order of the exits follow the official PyTorch implementation, github.com/yangle15/RANet-pytorch,
``models/RANet.py``):

* ``FirstLayer``: base features for every scale, computed as a chain from the finest scale down: CIFAR a 3x3
  conv-BN-ReLU, ImageNet a 7x7/2 conv (with bias)-BN-ReLU + 3x3/2 max-pool; then one 3x3 conv-BN-ReLU per further
  scale, stride 2 where the scale changes. Flow ``i`` starts from ``n_channels * gr_factor[i]`` channels.
* ``scale_flows[i]``: ``n_blocks + i * block_step`` blocks of ``step`` layers (``stepmode="even"``), or ``step``,
  ``2 step``, ... layers for block position 1, 2, ... (``"lg"``). Growth rate ``growth_rate * gr_factor[i]``.
  A layer is a bottleneck (``ConvBN``): 1x1 conv to ``min(C_in, bn_factor * C_new)`` channels, BN, ReLU, 3x3 conv,
  BN, ReLU (``bn_after=True``; the official model always builds this, whatever ``--bnAfter`` says), or
  BN-ReLU-1x1-BN-ReLU-3x3 (``bn_after=False``).
  - plain layer: ``cat([x, ConvBN(x)])``;
  - fusion layer: ``cat([resize(x), resize(ConvBN_up(low)), ConvBN(x)])`` where ``ConvBN_up`` makes
    ``floor(growth * compress_factor)`` channels from the coarser flow's matching feature (bottleneck width
    ``bn_factor[i-1]``) and resizing is bilinear with ``align_corners=True`` to the output size. In the "down"
    fusion blocks the last layer's ``ConvBN`` has stride 2, so the flow halves its resolution there;
  - a fusion block ends with ``cat([x, resize(ConvBasic_1x1(low_last))])`` (``conv_last``,
    ``floor(C * compress_factor)`` channels);
  - a block may end with a transition ``ConvBasic_1x1`` to ``floor(reduction * C)`` channels.
* ``classifier[k]``: CIFAR two 3x3/2 conv-BN-ReLU of 128 channels, 2x2 average pool, linear; ImageNet the same
  with ``C`` channels (the block's output width). As in the official model the linear layer expects the pooled map
  to be 1x1: 32x32 inputs on CIFAR, 224x224 on ImageNet (the coarsest flow at 7x7).

The ``state_dict`` keys are those of the official model, in the same order, so its checkpoints load directly (strip
the ``module.`` prefix of ``DataParallel``); with the same weights the unfused path reproduces the official outputs
bit for bit, and the fused path to float64 rounding (checked once against the official code).

Factories (configurations of the official scripts):

* :func:`ranet_cifar`: ``train_cifar.sh`` on the ``args.py`` defaults: nBlocks 2, block-step 2, step 4, stepmode
  even, scale-list 1-2-3-3, grFactor 4-2-1-1, bnFactor 4-2-1-1, nChannels 16, growthRate 6, compress-factor 0.25,
  reduction 0.5, bottleneck with BN after; 8 exits. (The script trains CIFAR-10; ``num_classes`` picks 10 or 100.)
  Parameters: 3,354,710 (100 classes), 3,261,830 (10 classes).
* :func:`ranet_imagenet`: ``train_imagenet.sh``: growthRate 16, step 8, stepmode even, scale-list 1-2-3-4,
  grFactor 4-2-1-1, bnFactor 4-2-1-1, nChannels 16 (the ``args.py`` default; the script does not set it), the rest
  as above; 8 exits, 87,972,617 parameters. The README's alternative ImageNet command is
  ``ranet_imagenet(n_channels=32, gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1))`` (131,123,991 parameters).

Execution. ``begin(x)`` computes the first layer (every scale's base features: they form one chain, so the coarsest
needs them all). ``step(state, k)`` advances only the scale flow of exit ``k`` to that exit's block, and a fusion
block first advances the coarser flow it reads (so exits may be skipped); the coarser flows' features are kept in
the state exactly as long as a finer flow still has to read them. The exits come in the official order (flow 0's,
then flow 1's, ...).

Two paths share the parameters:

* ``fused=False`` or training: the official structure (``nn`` modules, ``F.interpolate``, ``torch.cat``).
* ``fused=True`` in eval (default): BN folded into the convs it follows (cached; the cache is dropped on
  ``train()``/``eval()``, ``load_state_dict``, ``to()``/dtype changes and in-place parameter updates), every
  feature in preallocated channels-last buffers, one per run of layers at one resolution. Each conv writes its new
  channels at the next channel offset with :func:`~dynconv_ext.ops.conv2d_into`, resampled parts with
  :func:`~dynconv_ext.ops.resize_into`; the dense inputs are prefix views ``buf[:, :c]`` read in place, so no
  concat copies anything (a fusion layer's first part, the unresized input, is already the buffer's prefix). With
  ``bn_after=False`` the leading BN-ReLU cannot be folded into the 1x1 conv (the ReLU sits between them), so it is
  applied explicitly to the prefix view. No ``torch.cat`` on this path.
"""
import math
from itertools import chain
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.blocks import bn_scale_shift, fold_bn
from ..ops.conv2d_into import conv2d_into_unchecked, mark_constant_weight
from ..ops.masked_conv2d import ACTIVATIONS
from ..ops.resize_into import resize_into_unchecked
from .early_exit import EarlyExitNet, index_state, signature_changed, weights_signature

__all__ = ["RANet", "ranet_cifar", "ranet_imagenet"]

CL = torch.channels_last


# ----------------------------------------------------------------------------------------------------------------
# Modules (parameters + the unfused, autograd forward). Attribute names match the official state_dict keys.
# ----------------------------------------------------------------------------------------------------------------

class RAConvBasic(nn.Module):
    """conv (no bias) - BN - ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(x)


class RAConvBN(nn.Module):
    """Bottleneck: 1x1 to ``min(c_in, bn_width * c_out)`` channels, then 3x3 (stride 1 or 2) to ``c_out``.
    ``bn_after``: conv-BN-ReLU twice; otherwise BN-ReLU-conv, BN-ReLU-conv (no BN/ReLU at the end)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_after: bool, bn_width: int):
        super().__init__()
        inner = min(c_in, bn_width * c_out)
        self.bn_after, self.stride = bn_after, stride
        conv1 = nn.Conv2d(c_in, inner, 1, 1, 0, bias=False)
        conv3 = nn.Conv2d(inner, c_out, 3, stride, 1, bias=False)
        if bn_after:
            mods = [conv1, nn.BatchNorm2d(inner), nn.ReLU(True), conv3, nn.BatchNorm2d(c_out), nn.ReLU(True)]
        else:
            mods = [nn.BatchNorm2d(c_in), nn.ReLU(True), conv1, nn.BatchNorm2d(inner), nn.ReLU(True), conv3]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class RAConvNormal(nn.Module):
    """Dense layer: ``cat([x, ConvBN(x)])``."""

    def __init__(self, c_in: int, growth: int, bn_after: bool, bn_width: int):
        super().__init__()
        self.conv_normal = RAConvBN(c_in, growth, 1, bn_after, bn_width)

    def forward(self, x):
        return torch.cat([x, self.conv_normal(x)], dim=1)


class RAConvUpNormal(nn.Module):
    """Fusion layer on ``(low, x)``: ``cat([resize(x), resize(ConvBN_up(low)), ConvBN(x)])`` at ConvBN(x)'s size."""

    def __init__(self, c_in: int, c_low: int, growth: int, bn_after: bool, bn_width: int, bn_width_low: int,
                 compress_factor: float, down: bool):
        super().__init__()
        self.n_up = math.floor(growth * compress_factor)
        self.down = down
        self.conv_up = RAConvBN(c_low, self.n_up, 1, bn_after, bn_width_low)
        self.conv_normal = RAConvBN(c_in, growth - self.n_up, 2 if down else 1, bn_after, bn_width)

    def forward(self, low, x):
        new = self.conv_normal(x)
        size = tuple(new.shape[-2:])
        return torch.cat([_resize(x, size), _resize(self.conv_up(low), size), new], dim=1)


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _RABlock(nn.Module):
    """Channel bookkeeping shared by both block kinds (set in __init__ and by RANet's buffer plan)."""
    fusion = False
    down = False
    c_in: int
    c_end: int       # channels of the block's final concat (before the transition)
    c_out: int       # channels of the block's output (after the transition, if any)
    cap_in: int = 0    # capacity of the fused buffer the block's input lives in
    cap_down: int = 0  # capacity of the buffer a down layer starts
    cap_next: int = 0  # capacity of the buffer the transition writes (the next block's input)


class RANormalBlock(_RABlock):
    """``step`` dense layers, optionally a 1x1 transition. ``forward(x) -> (out, [x, layer outputs...])``."""

    def __init__(self, step: int, c_in: int, growth: int, reduction: float, trans: bool, bn_after: bool,
                 bn_width: int):
        super().__init__()
        self.step, self.growth, self.c_in = step, growth, c_in
        self.layers = nn.ModuleList(RAConvNormal(c_in + i * growth, growth, bn_after, bn_width) for i in range(step))
        self.c_end = c_in + step * growth
        self.trans_flag = trans
        self.c_out = self.c_end
        if trans:
            self.c_out = math.floor(reduction * self.c_end)
            self.trans = RAConvBasic(self.c_end, self.c_out, 1, 1, 0)

    def forward(self, x):
        outs = [x]
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        if self.trans_flag:
            x = self.trans(x)
        return x, outs


class RAFusionBlock(_RABlock):
    """``step`` fusion layers reading the coarser flow's block features ``low`` (``step + 1`` tensors), the last
    layer with stride 2 when ``down``; then ``cat([x, resize(conv_last(low[-1]))])`` and optionally a transition.
    ``forward(x, low) -> (out, [x, layer outputs...])``."""
    fusion = True

    def __init__(self, step: int, c_in: int, c_lows: Sequence[int], growth: int, reduction: float, trans: bool,
                 down: bool, compress_factor: float, bn_after: bool, bn_width: int, bn_width_low: int):
        super().__init__()
        self.step, self.growth, self.c_in, self.down = step, growth, c_in, down
        self.layers = nn.ModuleList(
            RAConvUpNormal(c_in + i * growth, c_lows[i], growth, bn_after, bn_width, bn_width_low, compress_factor,
                           down and i == step - 1) for i in range(step))
        c = c_in + step * growth
        self.n_last = math.floor(c * compress_factor)
        self.conv_last = RAConvBasic(c_lows[step], self.n_last, 1, 1, 0)
        self.c_end = c + self.n_last
        self.trans_flag = trans
        self.c_out = self.c_end
        if trans:
            self.c_out = math.floor(reduction * self.c_end)
            self.trans = RAConvBasic(self.c_end, self.c_out, 1, 1, 0)

    def forward(self, x, low):
        outs = [x]
        for i, layer in enumerate(self.layers):
            x = layer(low[i], x)
            outs.append(x)
        x = torch.cat([x, _resize(self.conv_last(low[self.step]), tuple(x.shape[-2:]))], dim=1)
        if self.trans_flag:
            x = self.trans(x)
        return x, outs


class RAFirstLayer(nn.Module):
    """Base features of every scale, finest first in ``layers``; ``forward`` returns them coarsest first."""

    def __init__(self, data: str, n_channels: int, gr_factor: Sequence[int], scale_list: Sequence[int]):
        super().__init__()
        gr, scales = list(gr_factor)[::-1], list(scale_list)[::-1]
        self.layers = nn.ModuleList()
        c = n_channels * gr[0]
        if data == "cifar":
            self.layers.append(RAConvBasic(3, c, 3, 1, 1))
        else:
            self.layers.append(nn.Sequential(nn.Conv2d(3, c, 7, 2, 3), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                             nn.MaxPool2d(3, 2, 1)))
        for i in range(1, len(gr)):
            stride = 1 if scales[i] == scales[i - 1] else 2
            self.layers.append(RAConvBasic(c, n_channels * gr[i], 3, stride, 1))
            c = n_channels * gr[i]

    def forward(self, x):
        res = []
        for layer in self.layers:
            x = layer(x)
            res.append(x)
        return res[::-1]


class RAClassifier(nn.Module):
    """``m`` (two 3x3/2 ConvBasic + AvgPool2d(2)), flatten, ``linear``."""

    def __init__(self, c_in: int, c_mid: int, num_classes: int):
        super().__init__()
        self.m = nn.Sequential(RAConvBasic(c_in, c_mid, 3, 2, 1), RAConvBasic(c_mid, c_mid, 3, 2, 1), nn.AvgPool2d(2))
        self.linear = nn.Linear(c_mid, num_classes)

    def forward(self, x):
        return self.linear(self.m(x).flatten(1))


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------

def _trans_flag(block: int, n_blocks: int, scale: int) -> bool:
    """Transition after block positions floor(j * n_blocks / scale), j = 1 .. scale - 1 (official rule)."""
    return any(block == math.floor(j * n_blocks / scale) for j in range(1, scale))


class RANet(EarlyExitNet):
    """Resolution Adaptive Network (see the module docstring for the structure and the two execution paths).

    Args follow the official ``args.py`` (``n_blocks`` = nBlocks, ``block_step``, ``step``, ``stepmode``,
    ``scale_list``, ``gr_factor``, ``bn_factor``, ``n_channels``, ``growth_rate``, ``compress_factor``,
    ``reduction``, ``bn_after``); ``data`` is ``"cifar"`` or ``"imagenet"`` (stem, classifier, input size).
    """

    def __init__(self, data: str = "cifar", num_classes: int = 100, n_channels: int = 16, growth_rate: int = 6,
                 n_blocks: int = 2, block_step: int = 2, step: int = 4, stepmode: str = "even",
                 scale_list: Sequence[int] = (1, 2, 3), gr_factor: Sequence[int] = (4, 2, 1),
                 bn_factor: Sequence[int] = (4, 2, 1), compress_factor: float = 0.25, reduction: float = 0.5,
                 bn_after: bool = True, fused: bool = True):
        super().__init__()
        if data not in ("cifar", "imagenet"):
            raise ValueError(f"RANet: data must be 'cifar' or 'imagenet', got {data!r}")
        if stepmode not in ("even", "lg"):
            raise ValueError(f"RANet: stepmode must be 'even' or 'lg', got {stepmode!r}")
        n_scales = len(scale_list)
        if len(gr_factor) != n_scales or len(bn_factor) != n_scales:
            raise ValueError(f"RANet: scale_list, gr_factor and bn_factor must have the same length, got "
                             f"{len(scale_list)}, {len(gr_factor)}, {len(bn_factor)}")
        if step < 1 or n_blocks < 1 or block_step < 0:
            raise ValueError("RANet: step and n_blocks must be >= 1, block_step >= 0")
        self.data, self.num_classes, self.fused = data, num_classes, fused
        self.op_backend = "auto"  # backend= of conv2d_into / resize_into on the fused path
        self.input_size = (3, 32, 32) if data == "cifar" else (3, 224, 224)
        self.n_scales = n_scales
        # nblocks[i]: blocks of flow i - 1 (nblocks[0] = 0); flow i's first nblocks[i] blocks are fusion blocks
        self.nblocks = [0] + [n_blocks + block_step * i for i in range(n_scales)]

        def layers_at(position):  # block position 1, 2, ...: the official shared `steps` list
            return step if stepmode == "even" else step * position

        self.scale_flows = nn.ModuleList()  # registered in the official order (state_dict key order)
        self.classifier = nn.ModuleList()
        self.FirstLayer = RAFirstLayer(data, n_channels, gr_factor, scale_list)
        exits: List[Tuple[int, int]] = []
        low_channels: List[List[int]] = []  # previous flow: per block, channels of [x, layer outputs...]
        for f in range(n_scales):
            flow = nn.ModuleList()
            c = n_channels * gr_factor[f]
            growth = growth_rate * gr_factor[f]
            chans: List[List[int]] = []
            for i in range(self.nblocks[f + 1]):
                pos = i + 1
                trans = _trans_flag(pos, self.nblocks[f + 1], scale_list[f])
                s = layers_at(pos)
                if pos > self.nblocks[f]:
                    blk = RANormalBlock(s, c, growth, reduction, trans, bn_after, bn_factor[f])
                else:
                    # official: the flow goes down at the last (scale - 1) block counts of the coarser flows
                    # (Python's [-0:] keeps the whole list when scale == 1)
                    down = pos in self.nblocks[:f + 1][-(scale_list[f] - 1):]
                    blk = RAFusionBlock(s, c, low_channels[i], growth, reduction, trans, down, compress_factor,
                                        bn_after, bn_factor[f], bn_factor[f - 1])
                flow.append(blk)
                chans.append([c + j * growth for j in range(s + 1)])
                c = blk.c_out
                if pos > self.nblocks[f]:
                    c_mid = 128 if data == "cifar" else c
                    self.classifier.append(RAClassifier(c, c_mid, num_classes))
                    exits.append((f, pos))
            low_channels = chans
            self.scale_flows.append(flow)
            self._plan_buffers(flow)
        self.exit_positions = exits
        self.num_exits = len(exits)

        for part in (self.scale_flows, self.classifier):  # the official initialization
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    m.weight.data.normal_(0, math.sqrt(2.0 / n))
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.data.fill_(1)
                    m.bias.data.zero_()
                elif isinstance(m, nn.Linear):
                    m.bias.data.zero_()
        self._fold_cache = {}

    @staticmethod
    def _plan_buffers(flow) -> None:
        """Capacities of the fused buffers. A buffer starts at the first layer, after a transition or at a down
        layer, and holds every concat until the next of those (consecutive blocks without a transition share it)."""
        need_next = 0
        for i in range(len(flow) - 1, -1, -1):
            blk = flow[i]
            chain_end = blk.c_end if (blk.trans_flag or i == len(flow) - 1) else need_next
            if blk.down:
                blk.cap_down = chain_end
                blk.cap_in = blk.c_in + (blk.step - 1) * blk.growth
            else:
                blk.cap_in = chain_end
            blk.cap_next = need_next if i < len(flow) - 1 else blk.c_out  # what a transition writes into
            need_next = blk.cap_in

    # ------------------------------------------------------------------------------------------------------------
    # folded-weight cache
    # ------------------------------------------------------------------------------------------------------------

    def clear_fold_cache(self) -> None:
        self._fold_cache = {}
        self._fold_sig = None
        self._fold_modules = None

    def _check_fold_cache(self) -> None:
        """Once a forward (``begin``): drops the folded weights if any parameter or buffer was changed in place
        (version counter) or replaced (data pointer) since they were folded, or if they were folded under
        inference_mode (inference tensors) and this forward is not. ``_folded`` then serves the cache as it is."""
        mods = getattr(self, "_fold_modules", None)
        if mods is None:  # walking the module tree costs ~1 ms at RANet's size: once per cache
            mods = self._fold_modules = list(self.modules())
        sig = weights_signature(t for m in mods for t in chain(m._parameters.values(), m._buffers.values())
                                if t is not None)
        if signature_changed(getattr(self, "_fold_sig", None), sig):
            self._fold_cache = {}
        self._fold_sig = sig

    def train(self, mode: bool = True):
        self.clear_fold_cache()
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self.clear_fold_cache()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_fold_cache()
        return super()._apply(fn, *args, **kwargs)

    def _folded(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]):
        """(weight, bias) of conv followed by bn in eval, detached and cached (the cache is validated once a
        forward, by ``begin``: ``_check_fold_cache``)."""
        hit = self._fold_cache.get(conv)
        if hit is None:
            # outside inference_mode: normal tensors with a version counter, which the kernels' packed-weight
            # cache needs; a folded weight is a fresh tensor nothing modifies, so it is marked constant (a
            # BN-less conv's weight is the parameter itself, and stays unmarked)
            with torch.inference_mode(False), torch.no_grad():  # (in this order: the first re-enables grad)
                if bn is None:
                    w, b = conv.weight.detach().contiguous(), None if conv.bias is None else conv.bias.detach()
                else:
                    w, b = fold_bn(conv, bn)
                    w = mark_constant_weight(w.contiguous())
                # with the op's argument lists, built once
                hit = (w, b.contiguous() if b is not None else None, list(conv.stride),
                       list(conv.padding), list(conv.dilation))
            self._fold_cache[conv] = hit
        return hit

    def _parts(self, seq: nn.Sequential) -> tuple:
        """seq's modules as a tuple (indexing an nn.Sequential costs ~1.5 us; the fused path does it ~400 times a
        forward), cached with the folded weights."""
        hit = self._fold_cache.get(seq)
        if hit is None:
            hit = self._fold_cache[seq] = tuple(seq)
        return hit

    def _bn_affine(self, bn: nn.BatchNorm2d):
        """(scale, shift) [1, C, 1, 1] of a BN in eval (a BN that precedes a ReLU and cannot be folded)."""
        hit = self._fold_cache.get(bn)
        if hit is None:
            with torch.no_grad():
                scale, shift = bn_scale_shift(bn)
                hit = (scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1))
            self._fold_cache[bn] = hit
        return hit

    # ------------------------------------------------------------------------------------------------------------
    # fused primitives: write into channel slices of channels-last buffers
    # ------------------------------------------------------------------------------------------------------------

    def _empty(self, like: torch.Tensor, channels: int, hw) -> torch.Tensor:
        # from the net's buffer pool: fresh buffers this large would be page-faulted in on every forward
        return self._pooled_empty(like, channels, hw[0], hw[1])

    @staticmethod
    def _conv_hw(conv: nn.Conv2d, hw):
        return tuple((hw[d] + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
                     // conv.stride[d] + 1 for d in range(2))

    def _conv_into(self, conv, bn, inp, out, off, act="relu"):
        if out.shape[0] == 0:
            return out
        w, b, stride, padding, dilation = self._folded(conv, bn)
        # (the arguments are the model's own: no Python-side validation, ~290 conv calls a forward)
        return conv2d_into_unchecked(inp, w, b, out, off, stride, padding, dilation, conv.groups, ACTIVATIONS[act],
                                     backend=self.op_backend)

    def _conv_new(self, conv, bn, inp, act="relu"):
        out = self._empty(inp, conv.out_channels, self._conv_hw(conv, inp.shape[-2:]))
        return self._conv_into(conv, bn, inp, out, 0, act)

    def _basic_into(self, cb: RAConvBasic, inp, out, off):
        n = self._parts(cb.net)
        return self._conv_into(n[0], n[1], inp, out, off)

    def _convbn_into(self, cbn: RAConvBN, inp, out, off):
        n = self._parts(cbn.net)
        if cbn.bn_after:
            mid = self._conv_new(n[0], n[1], inp)
            return self._conv_into(n[3], n[4], mid, out, off)
        scale, shift = self._bn_affine(n[0])  # BN-ReLU before the 1x1: applied explicitly
        pre = torch.addcmul(shift, inp, scale).relu_().contiguous(memory_format=CL)
        mid = self._conv_new(n[2], n[3], pre)
        return self._conv_into(n[5], None, mid, out, off, act=None)

    def _resized_into(self, write, c_new: int, hw_new, out, off):
        """``write(target, offset)`` produces ``c_new`` channels at ``hw_new``; put them, resized to ``out``'s
        size, at ``out[:, off:]`` (directly when the sizes agree)."""
        if tuple(hw_new) == tuple(out.shape[-2:]):
            return write(out, off)
        tmp = self._empty(out, c_new, hw_new)
        write(tmp, 0)
        if out.shape[0]:
            resize_into_unchecked(tmp, out, off, self.op_backend)
        return out

    # state: {"fused", "bufs": {id: buffer}, "next": int, "flows": [{"x", "done", "low"}]}; with fused=True a
    # feature is a descriptor (buffer id, channels) naming the prefix bufs[id][:, :channels], else a tensor.

    def _new_buf(self, state, like, channels, hw):
        bid = state["next"]
        state["next"] = bid + 1
        state["bufs"][bid] = self._empty(like, channels, hw)
        return bid, state["bufs"][bid]

    @staticmethod
    def _view(state, d):
        if not state["fused"]:
            return d
        return state["bufs"][d[0]][:, :d[1]]

    # ------------------------------------------------------------------------------------------------------------
    # the contract
    # ------------------------------------------------------------------------------------------------------------

    def begin(self, x: torch.Tensor) -> Any:
        """The first layer: every scale's base features (NCHW or channels-last input). The path (fused or not) is
        chosen here and kept by the state."""
        fused = bool(self.fused and not self.training)
        state = {"fused": fused, "bufs": {}, "next": 0,
                 "flows": [{"x": None, "done": 0, "low": []} for _ in range(self.n_scales)]}
        if not fused:
            for f, feat in enumerate(self.FirstLayer(x)):
                state["flows"][f]["x"] = feat
            return state
        self._check_fold_cache()
        x = x.contiguous(memory_format=CL)
        layers = self.FirstLayer.layers
        prev = None
        for li, layer in enumerate(layers):
            f = self.n_scales - 1 - li
            cap = self.scale_flows[f][0].cap_in
            if li == 0 and self.data == "imagenet":
                conv, bn, _, pool = layer
                stem = self._conv_new(conv, bn, x)
                pooled = pool(stem)
                bid, buf = self._new_buf(state, x, cap, pooled.shape[-2:])
                buf[:, :conv.out_channels].copy_(pooled)
                c = conv.out_channels
            else:
                conv = layer.net[0]
                inp = x if prev is None else self._view(state, prev)
                bid, buf = self._new_buf(state, x, cap, self._conv_hw(conv, inp.shape[-2:]))
                self._basic_into(layer, inp, buf, 0)
                c = conv.out_channels
            prev = (bid, c)
            state["flows"][f]["x"] = prev
        return state

    def step(self, state: Any, k: int):
        """Advances exit k's scale flow to exit k's block (first, as far as its fusion blocks read, the coarser
        flows), then runs classifier k. Exits may be skipped, not revisited."""
        if not 0 <= k < self.num_exits:
            raise IndexError(f"RANet.step: exit {k} out of range [0, {self.num_exits})")
        state = {**state, "bufs": dict(state["bufs"]),
                 "flows": [{**fl, "low": list(fl["low"])} for fl in state["flows"]]}
        f, pos = self.exit_positions[k]
        fl = state["flows"][f]
        if fl["done"] > pos or fl["x"] is None:
            raise ValueError(f"RANet.step: exit {k} (flow {f}, block {pos}) is already behind this state")
        self._advance(state, f, pos)
        x = self._view(state, fl["x"])
        logits = self._classify(self.classifier[k], x) if state["fused"] else self.classifier[k](x)
        if fl["done"] == len(self.scale_flows[f]):
            fl["x"] = None  # the flow is finished
        if state["fused"]:
            self._collect(state)
        return state, logits

    def keep(self, state: Any, index: torch.Tensor, reuse: bool = False) -> Any:
        if not state["fused"]:
            return index_state(state, index)
        state = super().keep(state, index, reuse)  # the buffers are gathered into pooled channels-last ones
        state["bufs"] = {k: v.contiguous(memory_format=CL) for k, v in state["bufs"].items()}
        return state

    # ------------------------------------------------------------------------------------------------------------
    # staged execution
    # ------------------------------------------------------------------------------------------------------------

    def _advance(self, state, f: int, pos: int) -> None:
        """Run flow f's blocks up to block position pos (and, first, what its fusion blocks read)."""
        fl = state["flows"][f]
        keep_low = f + 1 < self.n_scales  # the next flow reads this flow's block features
        while fl["done"] < pos:
            i = fl["done"]
            blk = self.scale_flows[f][i]
            low = None
            if blk.fusion:
                self._advance(state, f - 1, i + 1)
                low = state["flows"][f - 1]["low"][i]
                state["flows"][f - 1]["low"][i] = None  # only this block reads it
            if state["fused"]:
                x, outs = self._fused_block(state, blk, fl["x"], low)
            else:
                x, outs = blk(fl["x"], low) if blk.fusion else blk(fl["x"])
            fl["x"] = x
            fl["done"] = i + 1
            fl["low"].append(outs if keep_low else None)

    def _collect(self, state) -> None:
        """Drop the buffers no descriptor refers to any more."""
        live = set()
        for fl in state["flows"]:
            if fl["x"] is not None:
                live.add(fl["x"][0])
            for outs in fl["low"]:
                if outs is not None:
                    live.update(d[0] for d in outs)
        state["bufs"] = {k: v for k, v in state["bufs"].items() if k in live}

    def _fused_block(self, state, blk, x_desc, low):
        bid, c = x_desc
        buf = state["bufs"][bid]
        outs = [(bid, c)]
        for j, layer in enumerate(blk.layers):
            cur = buf[:, :c]
            if not blk.fusion:
                self._convbn_into(layer.conv_normal, cur, buf, c)
            else:
                if layer.down:  # a new buffer at the lower resolution, starting with cur resampled
                    hw = self._conv_hw(layer.conv_normal.net[3 if layer.conv_normal.bn_after else 5], cur.shape[-2:])
                    bid, buf = self._new_buf(state, cur, blk.cap_down, hw)
                    if buf.shape[0]:
                        resize_into_unchecked(cur, buf, 0, self.op_backend)
                lo = self._view(state, low[j])
                self._resized_into(lambda t, o: self._convbn_into(layer.conv_up, lo, t, o), layer.n_up,
                                   lo.shape[-2:], buf, c)
                self._convbn_into(layer.conv_normal, cur, buf, c + layer.n_up)
            c += blk.growth
            outs.append((bid, c))
        if blk.fusion:
            lo = self._view(state, low[blk.step])
            self._resized_into(lambda t, o: self._basic_into(blk.conv_last, lo, t, o), blk.n_last, lo.shape[-2:],
                               buf, c)
            c += blk.n_last
        if blk.trans_flag:
            tid, tbuf = self._new_buf(state, buf, blk.cap_next, buf.shape[-2:])
            self._basic_into(blk.trans, buf[:, :c], tbuf, 0)
            return (tid, blk.c_out), outs
        return (bid, c), outs

    def _classify(self, cls: RAClassifier, x):
        t = self._conv_new(cls.m[0].net[0], cls.m[0].net[1], x)
        t = self._conv_new(cls.m[1].net[0], cls.m[1].net[1], t)
        t = cls.m[2](t).flatten(1)
        return F.linear(t, cls.linear.weight, cls.linear.bias)


def ranet_cifar(num_classes: int = 100, **overrides) -> RANet:
    """RANet of the official ``train_cifar.sh`` (8 exits; see the module docstring). Keyword overrides take the
    :class:`RANet` argument names."""
    cfg = dict(data="cifar", num_classes=num_classes, n_channels=16, growth_rate=6, n_blocks=2, block_step=2, step=4,
               stepmode="even", scale_list=(1, 2, 3, 3), gr_factor=(4, 2, 1, 1), bn_factor=(4, 2, 1, 1),
               compress_factor=0.25, reduction=0.5, bn_after=True)
    cfg.update(overrides)
    return RANet(**cfg)


def ranet_imagenet(num_classes: int = 1000, **overrides) -> RANet:
    """RANet of the official ``train_imagenet.sh`` (8 exits; see the module docstring). Keyword overrides take the
    :class:`RANet` argument names, e.g. the README's variant ``n_channels=32, gr_factor=(4, 2, 2, 1),
    bn_factor=(4, 2, 2, 1)``."""
    cfg = dict(data="imagenet", num_classes=num_classes, n_channels=16, growth_rate=16, n_blocks=2, block_step=2,
               step=8, stepmode="even", scale_list=(1, 2, 3, 4), gr_factor=(4, 2, 1, 1), bn_factor=(4, 2, 1, 1),
               compress_factor=0.25, reduction=0.5, bn_after=True)
    cfg.update(overrides)
    return RANet(**cfg)
