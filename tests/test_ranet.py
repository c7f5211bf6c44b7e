"""RANet: official parameter counts, fused == unfused on every exit, staged execution, MACs, training."""
import pytest
import torch
import torch.nn.functional as F

from dynconv_ext.models import RANet, ranet_cifar, ranet_imagenet

# Parameter counts of the official implementation (github.com/yangle15/RANet-pytorch, models/RANet.py at commit
# 480efe4), obtained by instantiating it with the arguments of its scripts and counting
# sum(p.numel() for p in model.parameters()):
OFFICIAL_PARAMS = {
    "cifar100": 3_354_710,   # train_cifar.sh arguments with --data cifar100
    "cifar10": 3_261_830,    # train_cifar.sh as written (--data cifar10)
    "imagenet": 87_972_617,  # train_imagenet.sh (nChannels = args.py default 16, grFactor/bnFactor 4-2-1-1)
    "imagenet_readme": 131_123_991,  # README's ImageNet command: --nChannels 32 --grFactor/--bnFactor 4-2-2-1
    "cifar_readme_lg": 2_547_601,    # README's CIFAR command: --step 2 --stepmode lg --scale-list 1-2-3 4-2-1
}


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _randomize(model, seed=0):
    """Random BN statistics and affine parameters (so folding is really tested) and random linear biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)
            elif isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def _small_bn_before(**kw):
    """A small RANet with the BN-ReLU-conv ordering, a repeated scale, and down blocks both with and without a
    transition, transitions without a down (exercises every buffer-plan case)."""
    cfg = dict(data="cifar", num_classes=10, n_channels=4, growth_rate=4, n_blocks=1, block_step=1, step=2,
               scale_list=(1, 2, 2, 3), gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1), bn_after=False)
    cfg.update(kw)
    return RANet(**cfg)


@pytest.fixture(scope="module")
def cifar64():
    torch.manual_seed(0)
    return _randomize(ranet_cifar(100)).double().eval()


@pytest.fixture(scope="module")
def cifar64_ref(cifar64):
    """An input batch and the unfused eval outputs of ``cifar64`` on it."""
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cifar64.fused = False
    with torch.no_grad():
        ref = cifar64(x)
    cifar64.fused = True
    return x, ref


PATHS = ["fused-reference", "fused-auto", "unfused"]


def _set_path(m, path):
    """Sets the execution path (fused with the C++ ops, fused with the reference ops, unfused); returns the
    tolerance of float64 comparisons with the unfused outputs (relative to the largest logit)."""
    m.fused = path != "unfused"
    m.op_backend = "auto" if path == "fused-auto" else "reference"
    return 1e-11


# ---------------------------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------------------------

def test_parameter_counts_match_official():
    assert _nparams(ranet_cifar(100)) == OFFICIAL_PARAMS["cifar100"]
    assert _nparams(ranet_cifar(10)) == OFFICIAL_PARAMS["cifar10"]
    assert _nparams(ranet_cifar(10, step=2, stepmode="lg", scale_list=(1, 2, 3), gr_factor=(4, 2, 1),
                                bn_factor=(4, 2, 1))) == OFFICIAL_PARAMS["cifar_readme_lg"]
    with torch.device("meta"):  # instantiate and count only
        assert _nparams(ranet_imagenet()) == OFFICIAL_PARAMS["imagenet"]
        assert _nparams(ranet_imagenet(n_channels=32, gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1))) == \
            OFFICIAL_PARAMS["imagenet_readme"]


def test_exits_and_structure():
    m = ranet_cifar(100)
    assert m.num_exits == 8 and len(m.classifier) == 8
    # official exit order: two exits per flow, coarsest flow first, after the blocks beyond the previous flow's
    assert m.exit_positions == [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6), (3, 7), (3, 8)]
    assert [len(f) for f in m.scale_flows] == [2, 4, 6, 8]
    # fusion / down / transition pattern of the official rules for scale-list 1-2-3-3
    assert [[b.fusion for b in f].count(True) for f in m.scale_flows] == [0, 2, 4, 6]
    assert [[i + 1 for i, b in enumerate(f) if b.down] for f in m.scale_flows] == [[], [2], [2, 4], [4, 6]]
    assert [[i + 1 for i, b in enumerate(f) if b.trans_flag] for f in m.scale_flows] == [[], [2], [2, 4], [2, 5]]
    with torch.device("meta"):
        assert ranet_imagenet().num_exits == 8


# ---------------------------------------------------------------------------------------------------------------
# fused == unfused
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,channels_last", [("reference", False), ("auto", False), ("auto", True)])
def test_fused_matches_unfused_float64(cifar64, cifar64_ref, backend, channels_last):
    m = cifar64
    x, ref = cifar64_ref
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        m.fused, m.op_backend = True, backend
        try:
            out = m(x)
        finally:
            m.op_backend = "auto"
    assert len(out) == len(ref) == 8
    errs = [_rel_err(r, o) for r, o in zip(ref, out)]
    assert max(errs) < 1e-11, errs


def test_fused_matches_unfused_float32():
    torch.manual_seed(0)
    m = _randomize(ranet_cifar(10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.fused = False
        ref = m(x)
        m.fused = True
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = m(inp)
            for r, o in zip(ref, out):
                assert _rel_err(r, o) < 1e-4


def test_fused_bn_before_conv_ordering():
    """bn_after=False (BN-ReLU-conv): the leading BN is applied explicitly, the others folded."""
    torch.manual_seed(0)
    m = _randomize(_small_bn_before()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        m.fused = False
        ref = m(x)
        m.fused, m.op_backend = True, "reference"
        out = m(x)
    assert len(ref) == m.num_exits == 4
    for r, o in zip(ref, out):
        assert _rel_err(r, o) < 1e-11


def test_fused_imagenet_stem():
    """ImageNet stem (7x7/2 conv with bias, BN folded, max-pool) and classifier, at a small width and size."""
    torch.manual_seed(0)
    m = _randomize(RANet(data="imagenet", num_classes=10, n_channels=4, growth_rate=4, step=2, scale_list=(1, 2, 3),
                         gr_factor=(4, 2, 1), bn_factor=(4, 2, 1))).double().eval()
    x = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    with torch.no_grad():
        m.fused = False
        ref = m(x)
        m.fused, m.op_backend = True, "reference"
        out = m(x)
    for r, o in zip(ref, out):
        assert _rel_err(r, o) < 1e-11


def test_fused_path_has_no_cat(monkeypatch):
    torch.manual_seed(0)
    m = _randomize(_small_bn_before(bn_after=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.fused = False
        ref = m(x)
        m.fused = True

        def no_cat(*a, **k):
            raise AssertionError("torch.cat on the fused path")
        monkeypatch.setattr(torch, "cat", no_cat)
        out = m(x)
    for r, o in zip(ref, out):
        assert _rel_err(r, o) < 1e-4


def test_model_built_under_inference_mode():
    """Inference-tensor parameters (no version counter): no crash, and an in-place change is seen."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        m = _small_bn_before().eval()
        first = m(x)
        m.fused = False
        ref = m(x)
        m.fused = True
        torch.testing.assert_close(first[-1], ref[-1], rtol=1e-4, atol=1e-4)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(0.5)
        second = m(x)
        m.fused = False
        ref2 = m(x)
        torch.testing.assert_close(second[-1], ref2[-1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(second[-1], first[-1])


def test_fold_cache_invalidation():
    torch.manual_seed(0)
    m = _randomize(_small_bn_before(bn_after=True)).eval()
    m.op_backend = "reference"  # the cache logic does not depend on the op backend
    x = torch.randn(1, 3, 32, 32)

    def check():
        with torch.no_grad():
            m.fused = False
            ref = m(x)
            m.fused = True
            out = m(x)
        for r, o in zip(ref, out):
            assert _rel_err(r, o) < 1e-4

    check()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for k in sd:
        if k.endswith("running_mean"):
            sd[k] += 0.25
    m.load_state_dict(sd)              # load_state_dict
    check()
    assert m._fold_cache
    m.train()                          # train() / eval() drop the cache
    assert not m._fold_cache
    m.eval()
    with torch.no_grad():              # an in-place update in eval mode (version counters)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.bias.add_(0.1)
    check()


# ---------------------------------------------------------------------------------------------------------------
# staged execution
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_staged_subsets_match_forward(cifar64, cifar64_ref, path):
    m = cifar64
    tol = _set_path(m, path)
    x, full = cifar64_ref  # the unfused forward; the fused one matches it (tests above)
    keeps = {0: [0, 2], 3: [1]}  # positions within the running batch
    with torch.no_grad():
        state = m.begin(x)
        alive = torch.arange(3)
        for k in range(m.num_exits):
            state, logits = m.step(state, k)
            assert logits.shape == (len(alive), 100)
            assert _rel_err(full[k][alive], logits) < tol, k
            if k == 0:  # only the coarsest flow has run so far
                assert [fl["done"] for fl in state["flows"]] == [1, 0, 0, 0]
            if k in keeps:
                idx = torch.tensor(keeps[k])
                state = m.keep(state, idx)
                alive = alive[idx]
        assert alive.tolist() == [2]  # ran the last exits with a batch of 1
    _set_path(m, "fused-auto")


def test_forward_batch_of_one(cifar64, cifar64_ref):
    x, full = cifar64_ref
    tol = _set_path(cifar64, "fused-reference")
    with torch.no_grad():
        one = cifar64(x[1:2])
    _set_path(cifar64, "fused-auto")
    for r, o in zip(full, one):
        assert _rel_err(r[1:2], o) < tol


@pytest.mark.parametrize("fused", [True, False])
def test_staged_empty_index(fused):
    m = _small_bn_before(bn_after=True).eval()
    m.fused = fused
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = m.begin(x)
        for k in range(m.num_exits):
            state, logits = m.step(state, k)
            if k == 1:
                state = m.keep(state, torch.zeros(0, dtype=torch.long))
            assert logits.shape == (0 if k >= 2 else 2, 10)


def test_step_can_skip_exits(cifar64, cifar64_ref):
    m = cifar64
    x, full = cifar64_ref
    tol = _set_path(m, "fused-reference")
    with torch.no_grad():
        state = m.begin(x)
        state, l5 = m.step(state, 5)  # runs flow 2 to block 6, flow 1 and flow 0 as far as it reads them
        assert _rel_err(full[5], l5) < tol
        assert [fl["done"] for fl in state["flows"]] == [2, 4, 6, 0]
        state, l7 = m.step(state, 7)
        assert _rel_err(full[7], l7) < tol
        with pytest.raises(ValueError, match="already behind"):
            m.step(state, 6)
    _set_path(m, "fused-auto")


# ---------------------------------------------------------------------------------------------------------------
# MACs and training
# ---------------------------------------------------------------------------------------------------------------

def test_exit_macs():
    m = ranet_cifar(100).eval()
    macs = m.exit_macs()
    assert len(macs) == m.num_exits == 8
    assert all(c > 0 for c in macs)
    # the low-resolution exits cost less than the high-resolution flow they spare
    assert macs[0] < macs[6]  # exit 0 (stem + one coarse block) vs exit 6 (the finest flow's first 7 blocks)
    assert macs[0] < sum(macs) / 4
    assert m.fused and not m.training  # exit_macs restores the mode


@pytest.mark.parametrize("bn_after", [True, False])
def test_training_gradients_reach_all_parameters(bn_after):
    torch.manual_seed(0)
    m = _small_bn_before(bn_after=bn_after).train()
    assert m.fused  # ignored in training: the autograd path runs
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    outs = m(x)
    assert len(outs) == m.num_exits
    loss = sum(F.cross_entropy(o, y) for o in outs)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
