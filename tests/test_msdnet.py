"""MSDNet: official parameter counts, fused (conv2d_into) path == torch.cat path, staged execution, MACs, training."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv_ext.models import MSDNet, msdnet_cifar, msdnet_cifar_budgeted, msdnet_imagenet
import dynconv_ext.models.msdnet as msdnet_module

# Official parameter counts: sum(p.numel() for p in model.parameters()) of the official model
# (kalviny/MSDNet-PyTorch, models/msdnet.py at commit 9a6386e3, the version with the ImageNet first layer and
# classifier), instantiated with the official arguments of each configuration (args.py defaults + README /
# run_*.sh options; main.py derives nScales = len(grFactor)). The official code was run outside this repository;
# none of it is here.
OFFICIAL_PARAMS = {
    # --nBlocks 10 --stepmode even --step 2 --base 4 --nChannels 16 (run_anytime_cifar.sh)
    "cifar100_anytime_10blocks": 4955644,
    "cifar100_anytime_7blocks": 3067960,    # the README's anytime command (--nBlocks 7)
    "cifar10_anytime_10blocks": 4839544,
    "cifar100_budgeted_5blocks": 2078924,   # --nBlocks 5 --stepmode lin_grow --step 1 --base 1 --nChannels 16
    "cifar10_budgeted_5blocks": 2020874,
    "imagenet_step4": 23958440,             # --nBlocks 5 --step 4 --base 4 --nChannels 32 --growthRate 16 1-2-4-4
    "imagenet_step7": 62314472,             # --nBlocks 5 --step 7 --base 7 (run_imagenet.sh)
}

# Multiply-accumulates (every Conv2d: out.numel() * C_in/groups * kh * kw, every Linear: in * out; the official
# op_counter.py formula without its ReLU / pooling / bias terms) of the official models at batch 1,
# cumulative up to each classifier, all scales of every layer of a block computed (no lazy evaluation).
OFFICIAL_CUM_MACS_CIFAR100_ANYTIME = [14967296, 25259008, 37467648, 51667968, 61744640, 73590784, 87206400,
                                      99483648, 109548032, 121086976]
OFFICIAL_CUM_MACS_CIFAR100_BUDGETED = [6792704, 14209024, 27278848, 41373696, 58087936]
OFFICIAL_CUM_MACS_IMAGENET_STEP4 = [337214464, 681654272, 1003659008, 1249626240, 1355606016]  # 224x224

FACTORIES = {
    "cifar100_anytime_10blocks": lambda: msdnet_cifar(100),
    "cifar100_anytime_7blocks": lambda: msdnet_cifar(100, nBlocks=7),
    "cifar10_anytime_10blocks": lambda: msdnet_cifar(10),
    "cifar100_budgeted_5blocks": lambda: msdnet_cifar_budgeted(100),
    "cifar10_budgeted_5blocks": lambda: msdnet_cifar_budgeted(10),
    "imagenet_step4": lambda: msdnet_imagenet(1000, step=4),
    "imagenet_step7": lambda: msdnet_imagenet(1000, step=7),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (so folding is really exercised) and random Linear biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def both_paths(model, x):
    with torch.no_grad():
        model.fused = True
        fused = model(x)
        model.fused = False
        cat = model(x)
        model.fused = True
    return fused, cat


def small(data="cifar", seed=4, **kw):
    """A small MSDNet with every structural feature (3 scales, pruning, two transitions, a down unit at the layers
    that drop a scale) for the tests that run many forwards."""
    args = dict(data=data, n_blocks=3, base=2, step=2, stepmode="even", n_channels=8, growth_rate=4,
                gr_factor=(1, 2, 4), bn_factor=(1, 2, 4))
    args.update(kw)
    torch.manual_seed(seed)
    return randomize(MSDNet(10, **args), seed=seed).eval()


@pytest.fixture(scope="module")
def anytime():
    torch.manual_seed(0)
    return randomize(msdnet_cifar(100)).eval()


@pytest.fixture(scope="module")
def budgeted():
    torch.manual_seed(1)
    return randomize(msdnet_cifar_budgeted(100), seed=1).eval()


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_parameter_count_matches_official(name):
    model = FACTORIES[name]()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_layer_plan_anytime():
    m = msdnet_cifar(100)
    assert m.steps == [4] + [2] * 9 and m.exit_layers == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    # 22 layers, interval ceil(22 / 3) = 8: three scales up to layer 8, two up to 16, then one;
    # a transition right after each layer that drops a scale (9 and 17)
    assert [p.out_scales for p in m.plans] == [3] * 8 + [2] * 8 + [1] * 6
    assert [i + 1 for i, p in enumerate(m.plans) if p.transition] == [9, 17]
    assert m.plans[8].n_grown == 16 + 9 * 6 and m.plans[8].n_out == 35  # floor(0.5 * 70)
    assert m.num_exits == 10 and m.input_size == (3, 32, 32)


def test_layer_plan_budgeted_and_imagenet():
    m = msdnet_cifar_budgeted(100)
    assert m.steps == [1, 2, 3, 4, 5] and m.exit_layers == [1, 3, 6, 10, 15]
    assert [i + 1 for i, p in enumerate(m.plans) if p.transition] == [6, 11]  # interval ceil(15 / 3) = 5
    i4 = msdnet_imagenet(step=4)
    assert i4.num_scales == 4 and i4.steps == [4] * 5 and i4.input_size == (3, 224, 224)
    assert [i + 1 for i, p in enumerate(i4.plans) if p.transition] == [6, 11, 16]  # interval 5
    with pytest.raises(ValueError, match="step 4 or 7"):
        msdnet_imagenet(step=5)


# ---------------------------------------------------------------- fused == cat

def check_fused_matches_cat(model, x, tol):
    fused, cat = both_paths(model, x)
    assert len(fused) == len(cat) == model.num_exits
    for k, (a, b) in enumerate(zip(fused, cat)):
        assert a.shape == (x.shape[0], model.classifiers[k].linear.out_features)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"exit {k}")
    assert min(float(o.std()) for o in cat) > 1e-3  # the logits are not degenerate


def test_fused_matches_cat_anytime_float64_channels_last(anytime):
    model = anytime.double()
    try:
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        check_fused_matches_cat(model, x, 1e-10)
    finally:
        model.float()


def test_fused_matches_cat_budgeted_float32_nchw(budgeted):
    check_fused_matches_cat(budgeted, torch.randn(3, 3, 32, 32), 1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stepmode,bottleneck", [("even", True), ("lin_grow", False)])
def test_fused_matches_cat_small(dtype, tol, channels_last, stepmode, bottleneck):
    model = small(stepmode=stepmode, step=1 if stepmode == "lin_grow" else 2, bottleneck=bottleneck).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_fused_matches_cat(model, x, tol)


def test_fused_matches_cat_imagenet_first_layer():
    """The ImageNet first layer (7x7/2 conv with bias, max pool) and classifier (C channels), fused vs cat, on a
    narrow 4-scale model; 160x160 keeps the coarsest scale at 5x5 (enough for the classifier's two stride-2 convs
    and 2x2 pool)."""
    model = small("imagenet", gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), n_blocks=2, base=3, step=3)
    assert model.stem[0].conv.bias is not None and model.stem_pool is not None
    check_fused_matches_cat(model, torch.randn(2, 3, 160, 160), 1e-4)
    check_fused_matches_cat(model.double(), torch.randn(1, 3, 160, 160, dtype=torch.float64), 1e-10)


def test_fused_path_uses_no_cat_and_fills_channels_last_buffers(budgeted, monkeypatch):
    calls = []
    real = msdnet_module.conv2d_into_unchecked

    def counting(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat on the fused path")

    monkeypatch.setattr(msdnet_module, "conv2d_into_unchecked", counting)
    monkeypatch.setattr(torch, "cat", no_cat)
    with torch.no_grad():
        state = budgeted.begin(torch.randn(2, 3, 32, 32))
        for buf, c in zip(state["feats"], state["filled"]):
            assert buf.is_contiguous(memory_format=torch.channels_last) and buf.shape[1] >= c
        state, _ = budgeted.step(state, 0)
        # exit 0 needs only the coarsest scale of layer 1 (lazy): its down + normal units, 2 convs each
        assert len(calls) == 3 + 4 + 2
        assert calls[3:7] == [0, 64, 0, 64 + 12]  # bottleneck into scratch, 3x3 at the next offset of scale 2
        assert state["filled"] == [16, 32, 64 + 24]
        assert state["feats"][2].shape[1] == budgeted._capacity(0, 2) == (16 + 6 * 6) * 4  # up to layer 6's transition
        for k in range(1, budgeted.num_exits):
            state, _ = budgeted.step(state, k)
    assert all(f is None for f in state["feats"])  # nothing is kept after the last exit


def test_fold_cache_invalidation():
    model = small()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[-1]
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        other = small(seed=5)
        model.load_state_dict(other.state_dict())
        after, ref = both_paths(model, x)
        torch.testing.assert_close(after[-1], ref[-1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after[-1], before)
        model.classifiers[-1].conv2.bn.running_mean.add_(1.0)  # in-place change without train()/load
        after2, ref2 = both_paths(model, x)
        torch.testing.assert_close(after2[-1], ref2[-1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after2[-1], after[-1])
        model.train()
        assert model._fold_cache is None
        model.eval()
        model.load_state_dict(sd)
        torch.testing.assert_close(model(x)[-1], before)


def test_inference_mode_then_input_gradients():
    """Weights folded under inference_mode are refolded where autograd records; an eval forward whose input needs
    grad runs the cat path (conv2d_into's backward keeps views of buffers that later layers append to)."""
    model = small()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    x.requires_grad_(True)
    out = model(x)
    torch.testing.assert_close(out[-1].detach(), ref[-1], rtol=1e-4, atol=1e-4)
    out[-1].sum().backward()
    assert x.grad is not None and torch.any(x.grad != 0)
    with torch.no_grad():
        again = model(x.detach())
    torch.testing.assert_close(again[-1], ref[-1], rtol=1e-4, atol=1e-4)


def test_model_built_under_inference_mode():
    """Parameters created under inference_mode are inference tensors without a version counter: the fold cache
    must not crash on them, nor serve stale folded weights after an in-place change."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model = small()
        first, ref = both_paths(model, x)
        torch.testing.assert_close(first[-1], ref[-1], rtol=1e-4, atol=1e-4)
        model.classifiers[-1].conv2.bn.running_mean.add_(1.0)  # folded into the conv: the cache must see it
        second, ref2 = both_paths(model, x)
        torch.testing.assert_close(second[-1], ref2[-1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(second[-1], first[-1])


# ---------------------------------------------------------------- staged execution

@pytest.mark.parametrize("fused", [True, False])
def test_begin_step_keep_matches_forward(fused):
    model = small(n_blocks=7, base=1, step=1).double()
    try:
        model.fused = fused
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            full = model(x)
            idx = torch.arange(4)
            state = model.begin(x)
            keeps = {0: [0, 1, 3], 2: [0, 2], 4: [1]}  # positions within the current batch
            for k in range(model.num_exits):
                state, logits = model.step(state, k)
                torch.testing.assert_close(logits, full[k][idx], rtol=1e-10, atol=1e-10, msg=f"exit {k}")
                if k in keeps:
                    pos = torch.tensor(keeps[k])
                    state, idx = model.keep(state, pos), idx[pos]
                    if fused:
                        assert all(f is None or f.is_contiguous(memory_format=torch.channels_last)
                                   for f in state["feats"])
            assert idx.tolist() == [3]
            # skipping ahead (exit 3 straight after begin) computes the same
            state, logits = model.step(model.begin(x), 3)
            torch.testing.assert_close(logits, full[3], rtol=1e-10, atol=1e-10)
            with pytest.raises(ValueError, match="after the state's last exit"):
                model.step(state, 3)
    finally:
        model.fused = True


@pytest.mark.parametrize("fused", [True, False])
def test_batch_of_one_and_empty_index(fused):
    budgeted = small()
    budgeted.fused = fused
    try:
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            full = budgeted(x)
            one = budgeted(x[1:])
            for a, b in zip(one, full):
                torch.testing.assert_close(a, b[1:], rtol=1e-4, atol=1e-4)
            state, _ = budgeted.step(budgeted.begin(x), 0)
            state = budgeted.keep(state, torch.tensor([], dtype=torch.long))
            for k in range(1, budgeted.num_exits):
                state, logits = budgeted.step(state, k)
                assert logits.shape == (0, 10)
    finally:
        budgeted.fused = True


# ---------------------------------------------------------------- MACs

def test_exit_macs_against_official_and_hand_count(anytime, budgeted):
    all_macs = {}
    for name, model, official in (("anytime", anytime, OFFICIAL_CUM_MACS_CIFAR100_ANYTIME),
                                  ("budgeted", budgeted, OFFICIAL_CUM_MACS_CIFAR100_BUDGETED),
                                  ("imagenet", msdnet_imagenet(step=4), OFFICIAL_CUM_MACS_IMAGENET_STEP4)):
        macs = all_macs[name] = model.exit_macs()
        assert len(macs) == model.num_exits and all(m > 0 for m in macs)
        # every unit runs exactly once over all exits: the official total
        assert sum(macs) == official[-1]
        # lazy evaluation defers the finer scales of a block's last layers: never more than the official
        # cumulative cost, strictly less wherever a block ends with more than one scale
        cum = [sum(macs[:k + 1]) for k in range(len(macs))]
        assert all(c <= o for c, o in zip(cum, official))
        multi = [k for k, l in enumerate(model.exit_layers) if model.plans[l - 1].out_scales > 1]
        assert multi and all(cum[k] < official[k] for k in multi)

    # stage 0 of the budgeted model by hand: first layer (all scales), layer 1 at the coarsest scale only
    # (down unit from scale 1, normal unit at scale 2), classifier 0
    first = 32 * 32 * 16 * 3 * 9 + 16 * 16 * 32 * 16 * 9 + 8 * 8 * 64 * 32 * 9
    down = 16 * 16 * 32 * min(32, 2 * 12) + 8 * 8 * min(32, 2 * 12) * 12 * 9   # bnFactor[1] = 2, g/2 = 12
    normal = 8 * 8 * 64 * min(64, 4 * 12) + 8 * 8 * min(64, 4 * 12) * 12 * 9  # bnFactor[2] = 4
    classifier = 4 * 4 * (64 + 24) * 128 * 9 + 2 * 2 * 128 * 128 * 9 + 128 * 100
    assert all_macs["budgeted"][0] == first + down + normal + classifier
    # the official (non-lazy) stage 0 also runs layer 1's scales 0 and 1
    # (bottleneck widths min(C_in, bnFactor[s] * g/2): scale 0 normal 6, scale 1 down 6 / normal 12)
    scale0 = 32 * 32 * 16 * 6 + 32 * 32 * 6 * 6 * 9
    scale1 = (32 * 32 * 16 * 6 + 16 * 16 * 6 * 6 * 9) + (16 * 16 * 32 * 12 + 16 * 16 * 12 * 6 * 9)
    assert OFFICIAL_CUM_MACS_CIFAR100_BUDGETED[0] == first + down + normal + classifier + scale0 + scale1


# ---------------------------------------------------------------- training

def test_training_gradients_reach_every_parameter():
    torch.manual_seed(3)
    model = msdnet_cifar_budgeted(10).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    outs = model(x)
    assert len(outs) == 5
    loss = sum(F.cross_entropy(o, y) for o in outs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing[:5]
    # training uses batch statistics: eval (fused) differs, the unfused eval equals the official structure
    assert model._fold_cache is None
