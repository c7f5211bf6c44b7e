"""Gated residual blocks that compute only where their gate says (DynConv)."""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import active_rows, dilate_mask, mark_constant_weight
from ..ops.masked_conv2d import masked_conv2d_unchecked
from ..reference import expand_block_mask
from .gates import MaskUnit


def bn_scale_shift(bn: nn.BatchNorm2d):
    """(scale, shift) [C] with bn(x) == x * scale + shift per channel (eval statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Weight and bias of conv followed by bn (eval statistics), as one conv."""
    scale, b = bn_scale_shift(bn)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    if conv.bias is not None:
        b = b + conv.bias * scale
    return w, b


def dilate_pixel_mask(mask: torch.Tensor, kernel: int, dilation: int = 1) -> torch.Tensor:
    """Pixels a kernel x kernel (stride 1, 'same') conv must read so its output is right at `mask` [N, H, W]
    (:func:`dynconv_ext.ops.dilate_mask`: one C++ pass on CPU)."""
    return dilate_mask(mask, kernel, dilation)


def shortcut_macs(downsample: Optional[nn.Module], out_pixels: int) -> int:
    """MACs per sample of a (dense) projection shortcut computed at `out_pixels` output pixels."""
    if downsample is None:
        return 0
    return sum(m.in_channels // m.groups * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
               for m in downsample.modules() if isinstance(m, nn.Conv2d)) * out_pixels


def block_stats(cond, cond_dense: float, shortcut: int, gate: int, active, soft) -> dict:
    """The per-sample MAC and density record every gated block leaves in `last_stats`."""
    return {"dense_macs": cond_dense + shortcut, "executed_macs": cond + shortcut + gate,
            "conditional_dense_macs": cond_dense, "conditional_macs": cond, "density": active,
            "soft_density": soft().mean((1, 2)) if soft is not None else None}


class GatedBlock(nn.Module):
    """What every gated block shares: its gate, mask granularity and stride, and what the last forward left
    behind (`last_stats`, per-sample MACs and density; `last_mask`, bool [N, Ho, Wo])."""

    def _init_gating(self, inplanes: int, stride: int, block_size: int) -> None:
        self.gate = MaskUnit(inplanes, stride, block_size)
        self.block_size, self.stride = block_size, stride
        self.last_stats = {}
        self.last_mask = None
        # In eval, write the result into the identity tensor instead of a copy of it. Only safe when nobody
        # reads the block's input afterwards: the model containers turn it on for their blocks.
        self.inplace_residual = False

    def train(self, mode: bool = True):
        self.__dict__.pop("_fold_cache", None)  # eval() / train() refresh the folded weights (see _folded)
        return super().train(mode)

    def _folded(self, pairs) -> list:
        """[(weight, bias)] of each (conv, bn) of `pairs` with BN folded in. Without autograd through them (no_grad,
        inference_mode, or parameters that need no grad) the folded tensors are cached until a parameter or buffer
        changes (version counter, data pointer) and marked constant, so the CPU kernels keep them packed across
        calls instead of folding and repacking every forward. A write through ``.data`` bumps no version counter:
        call ``eval()`` again after one (``train()``/``eval()`` drop the cache)."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                p.requires_grad for c, b in pairs for p in (c.weight, c.bias, b.weight, b.bias) if p is not None)):
            return [fold_bn(c, b) for c, b in pairs]  # (a compiled graph folds as part of the graph)
        from ..models.early_exit import signature_changed, weights_signature  # (models import this module)
        tensors = [t for c, b in pairs for t in (c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var)
                   if t is not None]
        sig = weights_signature(tensors) + tuple(b.eps for _, b in pairs)
        cache = self.__dict__.get("_fold_cache", {})
        key = tuple(id(c) for c, _ in pairs)
        hit = cache.get(key)
        if hit is not None and not signature_changed(hit[0], sig):
            return hit[1]
        # outside inference_mode, so the folded weights are normal tensors with a version counter (the kernels'
        # packed-weight cache needs one); nothing modifies them
        with torch.inference_mode(False), torch.no_grad():
            folded = [(mark_constant_weight(w.contiguous()), b.contiguous()) for w, b in (fold_bn(c, bn)
                                                                                           for c, bn in pairs)]
        cache[key] = (sig, folded)
        self.__dict__["_fold_cache"] = cache
        return folded

    def _mask(self, x: torch.Tensor, out_hw, mask: Optional[torch.Tensor]):
        """(mask, soft): the gate's, unless the caller gave a mask (then soft is None). soft is a zero-argument
        function giving the gate's sigmoid probabilities (only the stats read them; in eval they cost a pass)."""
        if mask is not None:
            return mask, None
        if self.training:
            mask, soft = self.gate(x, out_hw)
            return mask, lambda: soft
        logits = self.gate.logits(x, out_hw)
        return logits > 0, lambda: torch.sigmoid(logits)

    @property
    def last_stats(self) -> dict:
        """Per-sample MACs and density of the last forward (see block_stats), computed when first read from that
        forward's masks (a few small reductions each block and call, which at batch 1 cost about a conv)."""
        thunk = self.__dict__.get("_stats_thunk")
        if thunk is not None:
            self.__dict__["_last_stats"], self.__dict__["_stats_thunk"] = thunk(), None
        return self.__dict__.get("_last_stats", {})

    @last_stats.setter
    def last_stats(self, value: dict) -> None:
        self.__dict__["_last_stats"], self.__dict__["_stats_thunk"] = value, None

    def _record(self, stats: Callable[[], dict], pix: torch.Tensor, out_hw) -> None:
        """Keeps this forward's stats (a function that computes them, see last_stats) and its pixel mask."""
        self.__dict__["_stats_thunk"] = stats
        pix = pix.reshape(pix.shape[0], *out_hw)
        self.last_mask = (pix if pix.dtype == torch.bool else pix > 0).detach()


class DynBasicBlock(GatedBlock):
    """ResNet basic block (3x3 conv-BN-ReLU, 3x3 conv-BN, + identity, ReLU) gated by a MaskUnit.

    Eval: conv1 runs on the gate's mask dilated by one pixel (conv2's halo), conv2 on the mask itself with
    the identity as residual; BN is folded into both convs and ReLU fused into their epilogues, so no dense
    intermediate is formed. Inactive pixels output the identity. Training: dense compute, the branch
    multiplied by the (straight-through) mask, so gradients reach the gate.

    After each forward, ``last_stats`` holds per-sample executed and dense MACs of this block.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 block_size: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self._init_gating(inplanes, stride, block_size)

    def dense_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: optional bool [N, Hm, Wm] overriding the gate (benchmarks, tests)."""
        h, w = x.shape[-2:]
        ho, wo = -(-h // self.conv1.stride[0]), -(-w // self.conv1.stride[1])
        identity = x if self.downsample is None else self.downsample(x)
        mask, soft = self._mask(x, (ho, wo), mask)
        if self.training:
            pix = expand_block_mask(mask, self.block_size, (ho, wo)).to(x.dtype)
            out = F.relu(identity + self.dense_branch(x) * pix)

            def densities():
                return pix.mean((1, 2, 3)), F.max_pool2d(pix, 3, 1, 1).mean((1, 2, 3))
        else:
            mask = mask.bool()
            pix = expand_block_mask(mask, self.block_size, (ho, wo))[:, 0]
            full = bool(pix.all())
            dil = pix if full else dilate_pixel_mask(pix, 3)
            (w1, b1), (w2, b2) = self._folded(self.conv_bn_pairs())
            # conv2 reads `hidden` only inside `dil`, where it is computed: no need to zero the rest.
            hidden = masked_conv2d_unchecked(x, w1, b1, None if full else dil, self.conv1.stride, 1,
                                             activation="relu", zero_inactive=False)
            out = masked_conv2d_unchecked(hidden, w2, b2, None if full else mask, 1, 1, block_size=self.block_size,
                                          residual=identity, activation="relu",
                                          inplace=self.inplace_residual and not full)

            def densities():
                return pix.sum((1, 2)) / float(ho * wo), dil.sum((1, 2)) / float(ho * wo)
        self._record(lambda: self._stats((h, w), (ho, wo), *densities(), soft), pix, (ho, wo))
        return out

    def _stats(self, in_hw, out_hw, active, dilated, soft):
        pixels = out_hw[0] * out_hw[1]
        c1 = self.conv1.in_channels * self.conv1.out_channels * 9
        c2 = self.conv2.in_channels * self.conv2.out_channels * 9
        return block_stats((dilated * c1 + active * c2) * pixels, float((c1 + c2) * pixels),
                           shortcut_macs(self.downsample, pixels), self.gate.macs(in_hw, out_hw), active, soft)

def receptive_input_mask(mask: torch.Tensor, in_hw, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Input pixels [N, H, W] read by a kernel x kernel conv (stride, padding) computed at output pixels `mask`."""
    if stride == 1 and 2 * padding == kernel - 1 and tuple(mask.shape[-2:]) == tuple(in_hw):
        return dilate_pixel_mask(mask, kernel)
    ho, wo = mask.shape[-2:]
    op_h = in_hw[0] - ((ho - 1) * stride - 2 * padding + kernel)
    op_w = in_hw[1] - ((wo - 1) * stride - 2 * padding + kernel)
    ones = torch.ones(1, 1, kernel, kernel, dtype=torch.float32, device=mask.device)
    hit = F.conv_transpose2d(mask[:, None].float(), ones, stride=stride, padding=padding,
                             output_padding=(op_h, op_w))
    return hit[:, 0] > 0


class DynBottleneck(GatedBlock):
    """ResNet bottleneck (1x1, 3x3 with the stride, 1x1 x4; torchvision v1.5 layout) gated by a MaskUnit.

    Eval: conv1 (1x1) runs on the input pixels conv2 reads for the gate's mask, conv2 and conv3 on the mask
    (conv3 with the identity as residual); BN folded, ReLU fused; inactive pixels output the identity.
    Training: dense, the branch multiplied by the (straight-through) mask.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 block_size: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self._init_gating(inplanes, stride, block_size)

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def dense_branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: optional bool [N, Hm, Wm] overriding the gate (benchmarks, tests)."""
        n, _, h, w = x.shape
        s = self.stride
        ho, wo = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
        identity = x if self.downsample is None else self.downsample(x)
        mask, soft = self._mask(x, (ho, wo), mask)
        if self.training:
            pix = expand_block_mask(mask, self.block_size, (ho, wo)).to(x.dtype)
            out = F.relu(identity + self.dense_branch(x) * pix)

            def densities():
                return pix.mean((1, 2, 3)), receptive_input_mask(pix[:, 0] > 0, (h, w), 3, s, 1).float().mean((1, 2))
        else:
            mask = mask.bool()
            pix = expand_block_mask(mask, self.block_size, (ho, wo))[:, 0]
            full = bool(pix.all())
            need = None if full else receptive_input_mask(pix, (h, w), 3, s, 1)
            (w1, b1), (w2, b2), (w3, b3) = self._folded(self.conv_bn_pairs())
            # Each intermediate is read only where it was computed: leave the rest unspecified (no zeroing).
            t = masked_conv2d_unchecked(x, w1, b1, need, 1, 0, activation="relu", zero_inactive=False)
            rows = None if (full or x.device.type != "cpu") else active_rows(mask, (ho, wo), self.block_size)
            t = masked_conv2d_unchecked(t, w2, b2, None if full else mask, s, 1, block_size=self.block_size,
                                        activation="relu", zero_inactive=False,
                                        rows=rows)  # conv2 and conv3 share one index map
            out = masked_conv2d_unchecked(t, w3, b3, None if full else mask, 1, 0, block_size=self.block_size,
                                          residual=identity, activation="relu",
                                          inplace=self.inplace_residual and not full, rows=rows)

            def densities():
                return pix.sum((1, 2)) / float(ho * wo), (torch.ones(n) if full else need.sum((1, 2)) / float(h * w))

        def stats():
            active, needed = densities()
            c1 = self.conv1.in_channels * self.conv1.out_channels
            c2 = self.conv2.in_channels * self.conv2.out_channels * 9
            c3 = self.conv3.in_channels * self.conv3.out_channels
            cond_dense = float(c1 * h * w + (c2 + c3) * ho * wo)
            cond = needed * c1 * h * w + active * (c2 + c3) * ho * wo
            return block_stats(cond, cond_dense, shortcut_macs(self.downsample, ho * wo),
                               self.gate.macs((h, w), (ho, wo)), active, soft)
        self._record(stats, pix, (ho, wo))
        return out


def dense_block_forward(block: nn.Module, x: torch.Tensor, fold: bool = False) -> torch.Tensor:
    """A gated block computed densely (gate ignored): relu(branch(x) + identity). fold=True folds eval BN."""
    identity = x if block.downsample is None else block.downsample(x)
    if not fold:
        return F.relu(block.dense_branch(x) + identity)
    pairs = block.conv_bn_pairs()
    t = x
    for i, (conv, bn) in enumerate(pairs):
        w, b = fold_bn(conv, bn)
        t = F.conv2d(t, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        if i < len(pairs) - 1:
            t = t.relu_()
    return t.add_(identity).relu_()


def conv_bn_act(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv-BN-ReLU6 in torchvision's MobileNetV2 layout (names .0, .1, .2)."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class DynInvertedResidual(GatedBlock):
    """MobileNetV2 inverted residual (expand 1x1, depthwise 3x3, project 1x1) gated by a MaskUnit.

    Only blocks with a residual (stride 1, same channels) are gated: inactive pixels output the identity.
    Eval: expand runs on the mask dilated by one pixel (the depthwise conv's halo), depthwise and project on
    the mask (project with the identity as residual); BN folded, ReLU6 fused. Parameter names follow
    torchvision's InvertedResidual (`conv.0.0`, ...).
    """

    def __init__(self, inp: int, oup: int, expand_ratio: int, block_size: int = 1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        if inp != oup:
            raise ValueError("DynInvertedResidual: gated blocks need a residual (stride 1, inp == oup)")
        layers = [conv_bn_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, 1, groups=hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.expand = expand_ratio != 1
        self._init_gating(inp, 1, block_size)
        self.downsample = None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, h, w = x.shape
        mask, soft = self._mask(x, (h, w), mask)
        mods = list(self.conv)
        exp, dw, proj, bnp = (mods[0], mods[1], mods[2], mods[3]) if self.expand else (None, mods[0], mods[1], mods[2])
        if self.training:
            pix = expand_block_mask(mask, self.block_size, (h, w)).to(x.dtype)
            out = x + self.conv(x) * pix
            pix_b = pix[:, 0] > 0

            def densities():
                return pix.mean((1, 2, 3)), F.max_pool2d(pix, 3, 1, 1).mean((1, 2, 3))
        else:
            mask = mask.bool()
            pix_b = expand_block_mask(mask, self.block_size, (h, w))[:, 0]
            full = bool(pix_b.all())
            t = x
            folded = self._folded(([(exp[0], exp[1])] if exp is not None else []) + [(dw[0], dw[1]), (proj, bnp)])
            (wd, bd), (wp, bp) = folded[-2:]
            if exp is not None:
                we, be = folded[0]
                need = None if full else dilate_pixel_mask(pix_b, 3)
                t = masked_conv2d_unchecked(x, we, be, need, 1, 0, activation="relu6", zero_inactive=False)
            rows = None if (full or x.device.type != "cpu") else active_rows(mask, (h, w), self.block_size)
            t = masked_conv2d_unchecked(t, wd, bd, None if full else mask, 1, 1, groups=dw[0].groups,
                                        block_size=self.block_size, activation="relu6", zero_inactive=False,
                                        rows=rows)  # shared with the projection
            out = masked_conv2d_unchecked(t, wp, bp, None if full else mask, 1, 0, block_size=self.block_size,
                                          residual=x, inplace=self.inplace_residual and not full, rows=rows)

            def densities():
                return (pix_b.sum((1, 2)) / float(h * w),
                        torch.ones(n) if (full or exp is None) else need.sum((1, 2)) / float(h * w))

        def stats():
            active, dilated = densities()
            hidden = dw[0].in_channels
            ce = c * hidden if exp is not None else 0
            cd, cp = hidden * 9, hidden * proj.out_channels
            cond_dense = float((ce + cd + cp) * h * w)
            cond = (dilated * ce + active * (cd + cp)) * h * w
            return block_stats(cond, cond_dense, 0, self.gate.macs((h, w), (h, w)), active, soft)
        self._record(stats, pix_b, (h, w))
        return out
