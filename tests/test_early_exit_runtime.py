"""The early-exit runtime: calibrated thresholds hit the prior, runtime answers equal the simulated evaluation,
the batch really shrinks, anytime prediction, edge cases and bad input."""
import math

import pytest
import torch
from torch import nn

from dynconv_ext import models
from dynconv_ext.inference import (EarlyExitRunner, calibrate_thresholds, confidences, exit_prior, simulate_exits,
                                   thresholds_from_confidences)
from dynconv_ext.models.early_exit import EarlyExitNet


class ToyNet(EarlyExitNet):
    """Three exits over a running feature vector; records the batch size every stage saw."""
    num_exits = 3
    input_size = (3, 4, 4)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(8, 5) for _ in range(3))
        self.seen = []

    def begin(self, x):
        return {"x": torch.relu(self.stem(x))}

    def step(self, state, k):
        self.seen.append((k, state["x"].shape[0]))
        x = torch.relu(self.stages[k](state["x"]))
        return {"x": x}, self.heads[k](x.mean((2, 3))) * 4


def test_exit_prior_is_geometric():
    q = exit_prior(0.5, 4)
    torch.testing.assert_close(q.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(q[1:] / q[:-1], torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(exit_prior(1.0, 5), torch.full((5,), 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="p must be > 0"):
        exit_prior(0.0, 3)


@pytest.mark.parametrize("p", [0.5, 0.9, 1.0, 1.5])
def test_thresholds_hit_the_prior_on_the_calibration_set(p):
    torch.manual_seed(1)
    k, n = 6, 1000
    conf = torch.rand(k, n, dtype=torch.float64)  # distinct values: no ties
    q = exit_prior(p, k)
    t = thresholds_from_confidences(conf, q)
    passes = conf >= t.unsqueeze(1)
    passes[-1] = True
    counts = torch.bincount(passes.to(torch.int8).argmax(0), minlength=k)
    expected = [math.floor(n * float(qk)) for qk in q[:-1]]
    assert counts[:-1].tolist() == expected
    assert int(counts.sum()) == n


def test_runtime_equals_simulation_and_shrinks_the_batch():
    net = ToyNet().double()
    x = torch.randn(40, 3, 4, 4, dtype=torch.float64)
    th = calibrate_thresholds(net, x, prior=0.8)
    run = EarlyExitRunner(net, th, compact_fraction=0.0)  # shrink after every exit
    run.cumulative_macs(x.shape[1:])
    net.seen.clear()
    out = run(x)
    seen = dict(net.seen)
    with torch.no_grad():
        logits = net(x)
    exits, preds = simulate_exits(logits, th)
    assert torch.equal(out.exits, exits) and torch.equal(out.predictions, preds)
    hist = out.histogram(3)
    assert hist.tolist() == torch.bincount(exits, minlength=3).tolist()
    # stage k ran on exactly the samples that had not left before it
    assert seen[0] == 40 and seen[1] == 40 - int(hist[0]) and seen[2] == 40 - int(hist[:2].sum())
    cum = torch.tensor(net.exit_macs()).cumsum(0)
    assert torch.equal(out.macs, cum[out.exits])
    for i in range(40):
        torch.testing.assert_close(out.logits[i], logits[out.exits[i]][i])


@pytest.mark.parametrize("micro_batch", [1, 7, 40, 64])
def test_micro_batches_give_the_same_answers(micro_batch):
    net = ToyNet().double()
    x = torch.randn(40, 3, 4, 4, dtype=torch.float64)
    th = calibrate_thresholds(net, x, prior=0.8)
    whole = EarlyExitRunner(net, th)(x)
    run = EarlyExitRunner(net, th, micro_batch=micro_batch)
    run.cumulative_macs(x.shape[1:])
    net.seen.clear()
    out = run(x)
    assert torch.equal(out.exits, whole.exits) and torch.equal(out.predictions, whole.predictions)
    assert torch.equal(out.macs, whole.macs)
    torch.testing.assert_close(out.logits, whole.logits)
    assert max(b for _, b in net.seen) == min(micro_batch, 40)  # no stage saw more than one chunk
    any2 = run.anytime(x, exit=1)
    ref2 = EarlyExitRunner(net, th).anytime(x, exit=1)
    assert torch.equal(any2.predictions, ref2.predictions) and any2.logits.shape == ref2.logits.shape
    assert run(x[:0]).exits.numel() == 0


def test_micro_batch_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch"):
        EarlyExitRunner(ToyNet(), [0.1, 0.2, 0.3], micro_batch=0)


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_lazy_compaction_gives_the_same_answers(fraction):
    net = ToyNet().double()
    x = torch.randn(40, 3, 4, 4, dtype=torch.float64)
    th = calibrate_thresholds(net, x, prior=0.8)
    eager = EarlyExitRunner(net, th, compact_fraction=0.0)(x)
    run = EarlyExitRunner(net, th, compact_fraction=fraction)
    run.cumulative_macs(x.shape[1:])
    net.seen.clear()
    lazy = run(x)
    assert torch.equal(lazy.exits, eager.exits) and torch.equal(lazy.predictions, eager.predictions)
    torch.testing.assert_close(lazy.logits, eager.logits)
    assert torch.equal(lazy.macs, eager.macs)
    if fraction == 1.0:  # never shrinks while someone is still running
        assert all(b == 40 for _, b in net.seen)


def test_all_confident_at_first_exit_runs_one_stage():
    net = ToyNet()
    run = EarlyExitRunner(net, [-math.inf, -math.inf, -math.inf])
    run.cumulative_macs((3, 4, 4))  # counting MACs runs the stages once on one sample
    net.seen.clear()
    out = run(torch.randn(5, 3, 4, 4))
    assert net.seen == [(0, 5)] and out.exits.tolist() == [0] * 5


def test_batch_of_one_and_empty_batch():
    net = ToyNet()
    run = EarlyExitRunner(net, [math.inf, math.inf, -math.inf])
    one = run(torch.randn(1, 3, 4, 4))
    assert one.exits.tolist() == [2] and one.predictions.shape == (1,)
    empty = run(torch.randn(0, 3, 4, 4))
    assert empty.predictions.numel() == 0 and empty.exits.numel() == 0


def test_anytime_exit_and_budget():
    net = ToyNet()
    x = torch.randn(6, 3, 4, 4)
    run = EarlyExitRunner(net, [0.5, 0.5, 0.0])
    with torch.no_grad():
        logits = net(x)
    a = run.anytime(x, exit=1)
    assert torch.equal(a.predictions, logits[1].argmax(1)) and a.exits.tolist() == [1] * 6
    cum = run.cumulative_macs(x.shape[1:])
    b = run.anytime(x, budget=float(cum[1]) + 1)
    assert b.exits.tolist() == [1] * 6
    with pytest.raises(ValueError, match="budget"):
        run.anytime(x, budget=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        run.anytime(x)
    with pytest.raises(ValueError, match="exit must be"):
        run.anytime(x, exit=3)


def test_bad_input():
    net = ToyNet()
    with pytest.raises(ValueError, match="thresholds has 2 entries"):
        EarlyExitRunner(net, [0.1, 0.2])
    with pytest.raises(TypeError, match="EarlyExitNet"):
        EarlyExitRunner(nn.Linear(2, 2), [0.1])
    with pytest.raises(ValueError, match="4-D"):
        EarlyExitRunner(net, [0.1, 0.2, 0.3])(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="prior"):
        thresholds_from_confidences(torch.rand(3, 10), [0.5, 0.5])
    with pytest.raises(ValueError, match="compact_fraction"):
        EarlyExitRunner(net, [0.1, 0.2, 0.3], compact_fraction=2.0)


def _calibrated_net(factory, seed: int, n: int, prior: float):
    """A float64 eval network, an input batch, its logits at every exit and thresholds calibrated on them."""
    torch.manual_seed(seed)
    net = factory(num_classes=10).double().eval()
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    return net, x, logits, thresholds_from_confidences(confidences(logits), exit_prior(prior, net.num_exits))


@pytest.mark.parametrize("factory", [models.msdnet_cifar, models.ranet_cifar])
def test_real_networks_runtime_equals_simulation(factory):
    """On MSDNet and RANet (fused path, float64): same exits and predictions as replaying thresholds over all
    exits, and each sample's logits equal its exit's logits from the full forward."""
    net, x, logits, th = _calibrated_net(factory, 0, 12, 0.8)
    out = EarlyExitRunner(net, th)(x)
    exits, preds = simulate_exits(logits, th)
    assert torch.equal(out.exits, exits) and torch.equal(out.predictions, preds)
    for i in range(12):
        torch.testing.assert_close(out.logits[i], logits[out.exits[i]][i], rtol=1e-9, atol=1e-9)


def test_buffer_pool_reuses_only_free_buffers():
    from dynconv_ext.models.early_exit import BufferPool
    pool = BufferPool()
    a = pool.empty((2, 3, 4, 4), torch.float32, "cpu")
    assert a.is_contiguous(memory_format=torch.channels_last)
    b = pool.empty((2, 3, 4, 4), torch.float32, "cpu")
    assert b.data_ptr() != a.data_ptr()  # `a` is still held: never handed out twice
    ptr = a.data_ptr()
    view = a[:, :2]
    del a
    c = pool.empty((2, 3, 4, 4), torch.float32, "cpu")
    assert c.data_ptr() not in (ptr, b.data_ptr())  # a view of the first buffer still holds it
    del view
    d = pool.empty((2, 3, 4, 4), torch.float32, "cpu")
    assert d.data_ptr() == ptr  # now free: reused
    with torch.inference_mode():
        e = pool.empty((2, 3, 4, 4), torch.float32, "cpu")
    assert e.is_inference() and e.data_ptr() not in (ptr, b.data_ptr(), c.data_ptr())


def test_buffer_pool_drops_free_buffers_over_its_limit():
    from dynconv_ext.models.early_exit import BufferPool
    pool = BufferPool(max_bytes=3 * 64 * 4)
    held = pool.empty((1, 64, 1, 1), torch.float32, "cpu")
    for n in range(2, 8):  # distinct shapes, each dropped right away
        pool.empty((n, 64, 1, 1), torch.float32, "cpu")
    assert pool.nbytes() <= 3 * 64 * 4 + 7 * 64 * 4  # at most the limit plus the newest buffer
    assert any(t is held for ts in pool._buffers.values() for t in ts)  # a held buffer is never dropped


def test_msdnet_pooled_buffers_do_not_leak_between_calls():
    net = models.msdnet_cifar(num_classes=10, nBlocks=3).eval()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref2 = [o.clone() for o in net(x2)]
        net.release_buffers()
        state = net.begin(x1)  # a caller holding a state keeps its buffers
        out2 = net(x2)
        for k in range(net.num_exits):
            state, _ = net.step(state, k)
    for a, b in zip(out2, ref2):
        torch.testing.assert_close(a, b)
    assert net.__dict__["_buffer_pool"].nbytes() > 0


def test_net_with_pooled_buffers_can_be_copied_and_saved():
    import copy
    import io
    net = models.msdnet_cifar(num_classes=10, nBlocks=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        twin = copy.deepcopy(net)
        assert twin.__dict__["_buffer_pool"].nbytes() == 0  # a copy starts with an empty pool
        for a, b in zip(twin(x), ref):
            torch.testing.assert_close(a, b)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        for a, b in zip(loaded(x), ref):
            torch.testing.assert_close(a, b)


def test_compaction_order_keeps_the_first_rows_in_place():
    from dynconv_ext.models.early_exit import compaction_order
    torch.manual_seed(3)
    for n in (1, 5, 33):
        for _ in range(5):
            running = torch.rand(n) < 0.6
            order = compaction_order(running)
            k = int(running.sum())
            assert order.numel() == k and running[order].all()          # exactly the running rows
            assert sorted(order.tolist()) == torch.nonzero(running).flatten().tolist()
            stay = running[:k]
            assert torch.equal(order[stay], torch.arange(k)[stay])      # kept rows of the prefix stay put
            assert (order[~stay] >= k).all()                            # the others come from beyond it


@pytest.mark.parametrize("factory", [models.msdnet_cifar, models.ranet_cifar])
def test_in_place_compaction_equals_gathering(factory):
    """keep(state, order, reuse=True) moves only the pooled buffers' rows that change place; the next stages then
    compute what the gathered state gives, and a tensor the pool does not own is never written."""
    from dynconv_ext.models.early_exit import compaction_order
    torch.manual_seed(1)
    net = factory(num_classes=10).double().eval()
    x = torch.randn(10, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    running = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    order = compaction_order(running)
    assert not torch.equal(order, torch.sort(order).values)  # some rows really move
    with torch.inference_mode():
        s0, _ = net.step(net.begin(x), 0)
        gathered = net.keep(s0, order)
        ref = [net.step(gathered, k)[1] for k in (1,)][0]
        s0, _ = net.step(net.begin(x), 0)
        s0["not_pooled"] = x.clone()  # a tensor the state holds but the pool does not own
        before = s0["not_pooled"].clone()
        moved = net.keep(s0, order, reuse=True)
        assert torch.equal(moved["not_pooled"], before[order]) and torch.equal(s0["not_pooled"], before)
        out = net.step(moved, 1)[1]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("factory", [models.msdnet_cifar, models.ranet_cifar])
def test_runner_in_place_compaction_gives_the_same_answers(factory):
    net, x, _, th = _calibrated_net(factory, 2, 24, 0.6)
    a = EarlyExitRunner(net, th, compact_fraction=0.0)(x)
    b = EarlyExitRunner(net, th, compact_fraction=0.0, compact_in_place=False)(x)
    assert torch.equal(a.exits, b.exits) and torch.equal(a.predictions, b.predictions)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert len(set(a.exits.tolist())) > 2  # samples left at several exits: several compactions ran


@pytest.mark.parametrize("native", [True, False])
def test_weights_signature_sees_every_change(native, monkeypatch):
    """The fold caches' key: equal while nothing changed; changed by an in-place update (version counter), a new
    tensor behind a parameter (data pointer), a dtype change; never equal for inference tensors. The C++ stamps and
    the Python fallback must agree."""
    from dynconv_ext.models import early_exit as ee
    if not native:
        monkeypatch.setattr(ee, "_native_stamps", None)
    elif ee._native_stamps is None:
        pytest.skip("extension not loaded")
    lin = nn.Linear(3, 2)
    ts = lambda: [lin.weight, lin.bias]  # noqa: E731
    sig = ee.weights_signature(ts())
    assert not ee.signature_changed(sig, ee.weights_signature(ts()))
    assert not ee.signature_changed(sig, ee.weights_signature(t for t in ts()))  # any iterable
    with torch.no_grad():
        lin.bias.add_(1.0)
    new = ee.weights_signature(ts())
    assert ee.signature_changed(sig, new)
    lin.weight.data = torch.randn(2, 3)  # no version bump on the old tensor: a new data pointer
    assert ee.signature_changed(new, ee.weights_signature(ts()))
    new = ee.weights_signature(ts())
    lin.double()
    assert ee.signature_changed(new, ee.weights_signature(ts()))
    with torch.inference_mode():
        frozen = nn.Linear(3, 2)
        a = ee.weights_signature([frozen.weight])
        assert ee.signature_changed(a, ee.weights_signature([frozen.weight]))
