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
import collections
import sys
import threading
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from ..profile.macs import LayerMacs


def tensor_stamp(t: torch.Tensor):
    """What identifies a parameter's current values for a cache of derived tensors (folded BN weights):
    (data pointer, version counter, dtype). An inference tensor (a model built under torch.inference_mode) has no
    version counter, so an in-place change to it could not be seen: its stamp is a fresh object that equals
    nothing, and caches keyed on it rebuild on every call instead of serving stale values."""
    if t.is_inference():
        return object()
    return (t.data_ptr(), t._version, t.dtype)


def weights_signature(tensors) -> tuple:
    """The stamps of `tensors` and whether inference mode is on: what a cache of derived tensors (folded weights)
    was built from. Compare two with :func:`signature_changed`. The stamps are taken in C++ where the extension is
    loaded (one bytes object; ~20 ns a tensor against ~0.3 us here: an MSDNet holds ~1000 parameters and buffers,
    checked once a forward), with the same meaning as :func:`tensor_stamp`'s."""
    tensors = tensors if isinstance(tensors, (list, tuple)) else list(tensors)
    if _native_stamps is not None:
        stamps = _native_stamps(tensors)
        return (object() if stamps is None else stamps, torch.is_inference_mode_enabled())
    return tuple(tensor_stamp(t) for t in tensors) + (torch.is_inference_mode_enabled(),)


def _load_native_stamps():
    from .. import _extension
    if _extension.load_error() is not None:
        return None
    from .. import _C
    return getattr(_C, "tensor_stamps", None)


_native_stamps = _load_native_stamps()


def signature_changed(old: Optional[tuple], new: tuple) -> bool:
    """Whether a cache built at signature `old` must be rebuilt for `new`: a tensor changed, or the cache was built
    under inference_mode (it may hold inference tensors, unusable where autograd records) and `new` is not."""
    return old is None or (old != new and (old[:-1] != new[:-1] or old[-1]))


def compaction_order(running: torch.Tensor) -> torch.Tensor:
    """The rows to keep of a batch whose rows ``running`` (bool) continue, in an order that leaves every kept row
    of the first ``running.sum()`` where it is and fills the others' places with the kept rows beyond them: with
    ``keep(state, order, reuse=True)`` only those rows move (the samples' order changes; track it with the same
    index)."""
    n = int(running.sum())
    order = torch.arange(n, device=running.device)
    holes = torch.nonzero(~running[:n]).flatten()
    if holes.numel():
        order[holes] = torch.nonzero(running[n:]).flatten() + n
    return order


def _moved_in_place(t: torch.Tensor, index: torch.Tensor) -> Optional[torch.Tensor]:
    """t restricted to rows ``index`` by moving, in t itself, only the rows whose place changes: when every row
    that moves comes from beyond the kept ones (a :func:`compaction_order`), so no source is overwritten first.
    None when the index is not of that form."""
    n = index.numel()
    dst = torch.nonzero(index != torch.arange(n, device=index.device)).flatten()
    if dst.numel():
        src = index[dst]
        if int(src.min()) < n:
            return None
        # straight row-block copies, a run of consecutive rows at a time (index_select into a scratch buffer and
        # index_copy_ back moved every byte twice: as slow as gathering all the kept rows)
        d, s = dst.tolist(), src.tolist()
        i = 0
        while i < len(d):
            j = i + 1
            while j < len(d) and d[j] == d[j - 1] + 1 and s[j] == s[j - 1] + 1:
                j += 1
            t[d[i]:d[i] + j - i].copy_(t[s[i]:s[i] + j - i])
            i = j
    return t[:n]


def index_state(state: Any, index: torch.Tensor, empty=None, reuse=None) -> Any:
    """``state`` with every tensor restricted to the samples ``index`` (dim 0); lists, tuples and dicts are
    walked; other values are kept. 4-D tensors keep their memory format (channels-last buffers stay so).
    ``empty(like, n)``, when given, supplies the uninitialized channels-last [n, C, H, W] tensor each
    channels-last 4-D tensor is gathered into (a buffer pool). ``reuse(t)``, when given, says whether the
    channels-last tensor t may be compacted in place (a buffer the caller owns and gives up with ``state``): then,
    for an index from :func:`compaction_order`, only the rows that change place are copied."""
    if isinstance(state, torch.Tensor):
        if state.dim() == 0:
            return state
        cl = state.dim() == 4 and state.is_contiguous(memory_format=torch.channels_last) and not state.is_contiguous()
        if cl and empty is not None and not (state.requires_grad and torch.is_grad_enabled()):  # out= has no grad
            if reuse is not None and reuse(state):
                moved = _moved_in_place(state, index)
                if moved is not None:
                    return moved
            return torch.index_select(state, 0, index, out=empty(state, index.numel()))
        picked = state[index]
        if cl:
            picked = picked.contiguous(memory_format=torch.channels_last)
        return picked
    if isinstance(state, (list, tuple)):
        return type(state)(index_state(s, index, empty, reuse) for s in state)
    if isinstance(state, dict):
        return {k: index_state(v, index, empty, reuse) for k, v in state.items()}
    return state


def _free_at(ts: List[torch.Tensor], i: int) -> bool:
    """True when nothing but the list ``ts`` holds tensor ``ts[i]``: no other Python reference to the tensor
    (getrefcount sees the list's and its own argument's) and no other tensor on its storage (views; the
    count includes the temporary storage wrapper)."""
    return sys.getrefcount(ts[i]) == 2 and torch._C._storage_Use_Count(ts[i].untyped_storage()._cdata) == 2


class BufferPool:
    """Channels-last feature buffers reused across forwards of the fused path.

    A batch-256 MSDNet needs ~100 MB of concat buffers per forward; fresh ones that large come from mmap and
    are page-faulted in on every call (glibc hands them back to the OS on free). A buffer is handed out again
    only when nothing else holds its storage (no tensor, no view: a caller keeping a state from ``begin``/``step``
    keeps its buffers to itself), under a lock. Free buffers beyond ``max_bytes`` are dropped oldest first.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._buffers: "collections.OrderedDict[tuple, List[torch.Tensor]]" = collections.OrderedDict()
        self._ptrs = set()  # the buffers' storage addresses (owns)
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # inference-mode tensors cannot be written in place outside inference mode: separate pools
        key = (tuple(shape), dtype, torch.device(device), torch.is_inference_mode_enabled())
        with self._lock:
            ts = self._buffers.get(key, [])
            for i in range(len(ts)):
                if _free_at(ts, i):
                    self._buffers.move_to_end(key)
                    return ts[i]
            t = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
            self._buffers.setdefault(key, []).append(t)
            if t.numel():  # (empty tensors share address 0)
                self._ptrs.add(t.untyped_storage().data_ptr())
            self._buffers.move_to_end(key)
            self._trim(keep=t)
            return t

    def __reduce__(self):
        # copies and pickles of a net start with an empty pool (buffers are scratch; a lock cannot be pickled)
        return (BufferPool, (self.max_bytes,))

    def owns(self, t: torch.Tensor) -> bool:
        """Whether t is (a view of) one of this pool's buffers."""
        with self._lock:
            return t.numel() > 0 and t.untyped_storage().data_ptr() in self._ptrs

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._buffers.values() for t in ts)

    def _trim(self, keep: torch.Tensor) -> None:
        total = self.nbytes()
        for key in list(self._buffers):
            if total <= self.max_bytes:
                break
            ts = self._buffers[key]
            i = 0
            while i < len(ts) and total > self.max_bytes:
                if ts[i] is not keep and _free_at(ts, i):
                    total -= ts[i].numel() * ts[i].element_size()
                    self._ptrs.discard(ts[i].untyped_storage().data_ptr())
                    del ts[i]
                else:
                    i += 1
            if not ts:
                del self._buffers[key]


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

    def keep(self, state: Any, index: torch.Tensor, reuse: bool = False) -> Any:
        """``state`` restricted to the samples ``index``. reuse=True: the caller gives ``state`` up, so the fused
        path's pooled buffers may be compacted in place; with an index from :func:`compaction_order` only the
        samples that change place are copied (the runtime's batch compactions). Never touches a tensor the pool
        does not own (an input the state holds, say)."""
        # channels-last buffers (the fused path's) are gathered into pooled ones: fresh large tensors would be
        # page-faulted in on every compaction
        pool = self.__dict__.get("_buffer_pool")
        owned = pool.owns if (reuse and pool is not None) else None
        return index_state(state, index, lambda t, n: self._pooled_empty(t, t.shape[1], t.shape[2], t.shape[3], n),
                           owned)

    def _pooled_empty(self, like: torch.Tensor, channels: int, h: int, w: int, n: int = None) -> torch.Tensor:
        """An uninitialized channels-last [n, channels, h, w] buffer from this net's pool (dtype and device of
        ``like``, n defaults to its batch), for the fused path."""
        pool = self.__dict__.get("_buffer_pool")
        if pool is None:
            pool = self.__dict__["_buffer_pool"] = BufferPool()
        return pool.empty((like.shape[0] if n is None else n, channels, h, w), like.dtype, like.device)

    def release_buffers(self) -> None:
        """Drop the fused path's pooled buffers (they are kept between forwards to avoid re-faulting them)."""
        self.__dict__.pop("_buffer_pool", None)

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
