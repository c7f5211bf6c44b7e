"""DynConv gated blocks and models: inference equals dense-then-mask, gates train, MACs are counted."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv_ext import models
from dynconv_ext.nn import DynBasicBlock, MaskUnit, SparsityCriterion, dilate_pixel_mask, fold_bn
from dynconv_ext.reference import expand_block_mask


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)


def _dense_block(b, x):
    identity = x if b.downsample is None else b.downsample(x)
    return identity, F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))) + identity)


@pytest.mark.parametrize("stride,block_size,channels_last", [(1, 1, False), (1, 4, True), (2, 1, True), (2, 2, False)])
def test_block_inference_equals_dense_then_mask(stride, block_size, channels_last):
    down = None if stride == 1 else nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    b = DynBasicBlock(8, 8 if stride == 1 else 16, stride, down, block_size)
    _randomize_bn(b)
    b.eval()
    x = F.relu(torch.randn(3, 8, 16, 16))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ho = 16 // stride
    mask = torch.rand(3, -(-ho // block_size), -(-ho // block_size)) < 0.4
    with torch.no_grad():
        y = b(x, mask)
        identity, dense = _dense_block(b, x)
    pm = expand_block_mask(mask, block_size, (ho, ho))
    torch.testing.assert_close(y, torch.where(pm, dense, identity), rtol=1e-4, atol=1e-4)


def test_gate_decides_in_eval():
    b = DynBasicBlock(8, 8).eval()
    x = F.relu(torch.randn(2, 8, 8, 8))
    b.gate.conv.bias.data.fill_(-5.0)  # gate says: nothing
    with torch.no_grad():
        assert torch.equal(b(x), x)  # identity everywhere, no conv computed
    assert float(b.last_stats["density"].sum()) == 0.0


def test_full_mask_equals_dense_resnet():
    net = models.dynconv_resnet32(num_classes=10)
    _randomize_bn(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    masks = models.block_masks(net, x, density=1.0)
    assert all(m.all() for m in masks)
    with torch.no_grad():
        torch.testing.assert_close(net(x, masks), net.forward_dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net(x), net.forward_dense(x), rtol=1e-4, atol=1e-4)  # fresh gates: all on


def test_partial_masks_equal_masked_dense_network():
    net = models.dynconv_resnet32(num_classes=10, block_size=2)
    _randomize_bn(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    masks = models.block_masks(net, x, density=0.3, coherent=True)
    with torch.no_grad():
        y = net(x, masks)
        h = net.relu(net.bn1(net.conv1(x)))
        for blk, m in zip(net.blocks, masks):
            identity, dense = _dense_block(blk, h)
            h = torch.where(expand_block_mask(m, 2, dense.shape[-2:]), dense, identity)
        ref = net.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)


def test_executed_macs():
    net = models.dynconv_resnet32().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x, models.block_masks(net, x, 1.0))
    full = models.executed_macs(net)
    assert full["dense"] == pytest.approx(69.12e6, rel=0.01)  # ResNet-32 on CIFAR
    with torch.no_grad():
        net(x, models.block_masks(net, x, 0.25))
    quarter = models.executed_macs(net)
    assert (quarter["executed"] < 0.6 * full["dense"]).all()
    dens = torch.stack([s["density"] for s in quarter["per_block"]])
    assert torch.allclose(dens.mean(), torch.tensor(0.25), atol=0.05)


def test_last_stats_are_the_last_forwards():
    # The stats are computed when first read (not in the forward): they must still be those of the last forward,
    # computed once, and the gate's soft densities must be there in eval.
    net = models.dynconv_resnet32().eval()
    x = torch.randn(2, 3, 32, 32)
    blk = net.blocks[3]
    with torch.no_grad():
        net(x, models.block_masks(net, x, 0.25))
        net(x, models.block_masks(net, x, 1.0))
    first = blk.last_stats
    assert first is blk.last_stats  # computed once
    assert torch.equal(first["density"], torch.ones(2))
    with torch.no_grad():
        net(x)  # the gates decide: their soft probabilities are recorded too
    gated = blk.last_stats
    assert gated is not first and gated["soft_density"] is not None
    assert torch.allclose(gated["density"], blk.last_mask.float().mean((1, 2)))
    blk.last_stats = {"x": 1}
    assert blk.last_stats == {"x": 1}


def test_gradients_reach_gates():
    net = models.dynconv_resnet32().train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(net(x), y)
    loss = loss + SparsityCriterion(0.5)(models.executed_macs(net)["per_block"], progress=0.5)
    loss.backward()
    for b in net.blocks:
        assert b.gate.conv.weight.grad is not None and b.gate.conv.weight.grad.abs().sum() > 0


def test_training_lowers_loss_and_moves_density_to_budget():
    torch.manual_seed(0)
    net = models.dynconv_resnet32().train()
    for b in net.blocks:  # start from DynConv's "mostly executed" init, but not saturated
        b.gate.conv.bias.data.fill_(1.0)
    crit = SparsityCriterion(budget=0.3, anneal_fraction=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    first_task = first_density = None
    for step in range(25):
        logits = net(x)
        stats = models.executed_macs(net)["per_block"]
        task = F.cross_entropy(logits, y)
        density = torch.stack([s["density"] for s in stats]).mean().item()
        if step == 0:
            first_task, first_density = task.item(), density
        loss = task + crit(stats, progress=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.item() < first_task
    assert abs(density - 0.3) < abs(first_density - 0.3) - 0.1


def test_fold_bn_and_dilation_helpers():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
    _randomize_bn(bn)
    bn.eval()
    x = torch.randn(1, 3, 6, 6)
    w, b = fold_bn(conv, bn)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 2, 2] = True
    assert dilate_pixel_mask(m, 3).sum() == 9 and dilate_pixel_mask(m, 1).sum() == 1


def test_mask_unit_shapes_and_modes():
    g = MaskUnit(8, stride=2, block_size=4)
    x = torch.randn(2, 8, 32, 32)
    g.train()
    m, soft = g(x, (16, 16))
    assert m.shape == (2, 4, 4) and set(m.unique().tolist()) <= {0.0, 1.0} and m.requires_grad
    g.eval()
    m, _ = g(x, (16, 16))
    assert m.dtype == torch.bool and m.shape == (2, 4, 4)


def test_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.DynResNetCifar(depth=33)


# ---- bottleneck blocks and ImageNet-layout ResNets ----
from dynconv_ext.nn.blocks import DynBottleneck, receptive_input_mask  # noqa: E402


@pytest.mark.parametrize("stride,hw", [(1, 9), (2, 9), (2, 8), (1, 6)])
def test_receptive_input_mask_brute_force(stride, hw):
    ho = (hw + 2 - 3) // stride + 1
    m = torch.rand(2, ho, ho) < 0.3
    got = receptive_input_mask(m, (hw, hw), 3, stride, 1)
    want = torch.zeros(2, hw, hw, dtype=torch.bool)
    for n, i, j in m.nonzero().tolist():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                y, x = i * stride + di, j * stride + dj
                if 0 <= y < hw and 0 <= x < hw:
                    want[n, y, x] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("stride,block_size", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_bottleneck_inference_equals_dense_then_mask(stride, block_size):
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride, bias=False), nn.BatchNorm2d(32))
    b = DynBottleneck(16, 8, stride, down, block_size)
    _randomize_bn(b)
    b.eval()
    x = F.relu(torch.randn(2, 16, 14, 14)).contiguous(memory_format=torch.channels_last)
    ho = (14 - 1) // stride + 1
    mask = torch.rand(2, -(-ho // block_size), -(-ho // block_size)) < 0.4
    with torch.no_grad():
        y = b(x, mask)
        identity = b.downsample(x)
        dense = F.relu(b.dense_branch(x) + identity)
    pm = expand_block_mask(mask, block_size, (ho, ho))
    torch.testing.assert_close(y, torch.where(pm, dense, identity), rtol=1e-4, atol=1e-4)
    assert b.last_stats["executed_macs"].shape == (2,)


def test_resnet50_layout_and_full_mask():
    net = models.dynconv_resnet50(num_classes=10)
    _randomize_bn(net)
    net.eval()
    n_params = sum(p.numel() for name, p in net.named_parameters() if ".gate." not in name)
    assert n_params == 25557032 - 2048 * 990 - 990  # torchvision resnet50 with a 10-class head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = net(x, models.block_masks(net, x, 1.0))
        torch.testing.assert_close(y, net.forward_dense(x), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(net.forward_dense(x, fold_bn=True), net.forward_dense(x), rtol=1e-3, atol=1e-3)
    assert models.executed_macs(net)["dense"] > 0


def test_resnet50_trains_gates():
    net = models.dynconv_resnet50(num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    loss = F.cross_entropy(net(x), torch.tensor([1, 3]))
    loss = loss + SparsityCriterion(0.5)(models.executed_macs(net)["per_block"], 0.5)
    loss.backward()
    assert all(b.gate.conv.weight.grad.abs().sum() > 0 for b in models.gated_blocks(net))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dynamic_from_torchvision_keeps_weights(arch):
    tv = pytest.importorskip("torchvision")
    from dynconv_ext import nn as dnn
    ref = getattr(tv.models, arch)(num_classes=7)
    _randomize_bn(ref)
    ref.eval()
    dyn = dnn.dynamic_from_torchvision(ref, block_size=2)
    assert not dyn.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), ref(x), rtol=1e-3, atol=1e-3)  # fresh gates are "all on"
        torch.testing.assert_close(dyn.forward_dense(x), ref(x), rtol=1e-3, atol=1e-3)
        masks = models.block_masks(dyn, x, 0.3)
        y = dyn(x, masks)
    assert y.shape == (1, 7) and (models.executed_macs(dyn)["executed"] < models.executed_macs(dyn)["dense"]).all()


def test_dynamic_from_torchvision_rejects_other_models():
    tv = pytest.importorskip("torchvision")
    from dynconv_ext import nn as dnn
    with pytest.raises(ValueError, match="expected a torchvision ResNet"):
        dnn.dynamic_from_torchvision(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="ResNeXt"):
        dnn.dynamic_from_torchvision(tv.models.resnext50_32x4d())


def test_mobilenetv2_matches_torchvision_and_masks():
    tv = pytest.importorskip("torchvision")
    ref = tv.models.mobilenet_v2(num_classes=9)
    _randomize_bn(ref)
    ref.eval()
    net = models.dynconv_mobilenetv2(num_classes=9)
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".gate." in k for k in missing)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)  # fresh gates: all on
        for fold in (False, True):  # the dense baselines, with BN as modules and folded into the convs
            torch.testing.assert_close(net.forward_dense(x, fold_bn=fold), ref(x), rtol=1e-4, atol=1e-4)
        masks = models.block_masks(net, x, 0.3)
        assert len(masks) == 10
        y = net(x, masks)
        # reference: dense blocks, masked where the gate is off
        h = x
        k = 0
        for m in net.features:
            if isinstance(m, models.mobilenetv2.DynInvertedResidual):
                h = torch.where(expand_block_mask(masks[k], 1, h.shape[-2:]), h + m.conv(h), h)
                k += 1
            else:
                h = m(h)
        ref_y = net.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
    torch.testing.assert_close(y, ref_y, rtol=1e-3, atol=1e-3)
    stats = models.executed_macs(net)
    assert (stats["executed"] < stats["dense"]).all()


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "inverted"])
def test_eval_fold_cache_follows_parameter_changes(kind):
    """Eval forwards fold BN once and reuse it (packed) until a parameter or buffer changes: an in-place change to
    a conv weight, a BN statistic or a load_state_dict must show in the next forward's output."""
    from dynconv_ext.nn.blocks import DynInvertedResidual
    torch.manual_seed(4)
    if kind == "basic":
        b = DynBasicBlock(16, 16)
    elif kind == "bottleneck":
        b = DynBottleneck(64, 16)
    else:
        b = DynInvertedResidual(16, 16, 6)
    _randomize_bn(b)
    b.eval()
    x = torch.randn(2, 64 if kind == "bottleneck" else 16, 8, 8)
    mask = torch.rand(2, 8, 8) < 0.5
    gate = set(b.gate.modules())
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d) and m not in gate]
    bns = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d) and m not in gate]

    def fresh():  # the same block with nothing cached
        c = type(b).__new__(type(b))
        c.__dict__.update({k: v for k, v in b.__dict__.items() if k != "_fold_cache"})
        return c(x.clone(), mask)

    with torch.no_grad():
        y0 = b(x.clone(), mask)
        torch.testing.assert_close(b(x.clone(), mask), y0, rtol=0, atol=0)  # served from the cache
        assert "_fold_cache" in b.__dict__
        convs[0].weight.mul_(1.5)
        y1 = b(x.clone(), mask)
        assert not torch.allclose(y1, y0)
        torch.testing.assert_close(y1, fresh(), rtol=1e-6, atol=1e-6)
        bns[-1].running_var.mul_(4.0)
        y2 = b(x.clone(), mask)
        assert not torch.allclose(y2, y1)
        torch.testing.assert_close(y2, fresh(), rtol=1e-6, atol=1e-6)
        state = {k: v.clone() for k, v in b.state_dict().items()}
        state[next(k for k in state if k.endswith("running_mean"))] += 1.0
        b.load_state_dict(state)
        y3 = b(x.clone(), mask)
        assert not torch.allclose(y3, y2)
        torch.testing.assert_close(y3, fresh(), rtol=1e-6, atol=1e-6)


def test_eval_refreshes_the_fold_cache_after_a_data_write():
    """A write through .data bumps no version counter; eval() (train(False)) drops the cache, so the next forward
    sees it (a prune-then-evaluate script)."""
    torch.manual_seed(6)
    b = DynBasicBlock(8, 8)
    _randomize_bn(b)
    b.eval()
    x, mask = torch.randn(2, 8, 8, 8), torch.rand(2, 8, 8) < 0.5
    with torch.no_grad():
        y0 = b(x.clone(), mask)
        b.conv2.weight.data[:4] = 0.0
        b.eval()
        y1 = b(x.clone(), mask)
        b.__dict__.pop("_fold_cache", None)
        torch.testing.assert_close(y1, b(x.clone(), mask), rtol=0, atol=0)
    assert not torch.allclose(y0, y1)


def test_eval_forward_with_grad_still_reaches_the_weights():
    """With autograd on (eval mode, parameters requiring grad) the block folds afresh, so gradients flow to the
    conv weights through the folded ones."""
    torch.manual_seed(5)
    b = DynBasicBlock(8, 8)
    _randomize_bn(b)
    b.eval()
    x = torch.randn(2, 8, 8, 8)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        b(x, mask)  # fills the cache
    b(x, mask).sum().backward()
    assert b.conv1.weight.grad is not None and b.conv1.weight.grad.abs().sum() > 0


def test_randomize_gates_gives_partial_masks():
    torch.manual_seed(0)
    net = models.randomize_gates(models.dynconv_resnet32().eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)
    dens = torch.stack([b.last_stats["density"] for b in models.gated_blocks(net)])
    assert 0.2 < float(dens.mean()) < 0.8  # untrained gates (bias 3) would execute everything
    assert all(float(b.gate.conv.bias.detach().abs().max()) == 0.0 for b in models.gated_blocks(net))
