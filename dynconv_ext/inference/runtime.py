"""Early-exit execution that really skips work: budgeted batches and anytime prediction."""
import dataclasses
from typing import List, Optional, Sequence

import torch

from ..models.early_exit import EarlyExitNet, compaction_order
from .calibration import confidences


@dataclasses.dataclass
class EarlyExitResult:
    """Per-sample outcome of an early-exit run (all tensors have one entry per input sample)."""
    predictions: torch.Tensor  # [N] class index
    exits: torch.Tensor        # [N] exit index that answered
    macs: torch.Tensor         # [N] MACs the sample needed (stem + stages up to its exit; rows carried along by
    #                            lazy compaction, see compact_fraction, are not counted)
    logits: torch.Tensor       # [N, classes] logits of the answering exit

    def histogram(self, num_exits: int) -> torch.Tensor:
        """How many samples left at each exit."""
        return torch.bincount(self.exits, minlength=num_exits)


class EarlyExitRunner:
    """Runs an :class:`EarlyExitNet` so that samples leave the batch at the first confident exit.

    After every classifier the samples whose confidence (largest softmax probability) reaches that exit's
    threshold are answered and removed; the rest continue with a smaller batch, so later stages compute only
    for them (and a stage runs only while some sample still needs it). Thresholds come from
    :func:`~dynconv_ext.inference.calibrate_thresholds`. The answers equal those of the simulated evaluation
    (every exit on the whole batch, thresholds replayed): :func:`~dynconv_ext.inference.simulate_exits`.

    Args:
        net: the network (put in eval mode here).
        thresholds: [K] confidence thresholds; the last exit accepts everything regardless.
        compact_fraction: shrink the batch only once at least this fraction of its rows has exited (0: after
            every exit that answers someone). Shrinking copies the state (``net.keep``); when only a few samples
            leave, carrying them along for a stage can cost less (measured on MSDNet, batch 256: 0.1 was 8-15 %
            faster than 0 at priors p >= 1 and within noise below). Answers are the same either way.
        compact_in_place: compact the fused path's buffers in place, moving only the samples whose place the
            exited ones leave (:func:`~dynconv_ext.models.early_exit.compaction_order`) instead of gathering every
            remaining sample into fresh buffers. Answers are the same either way.
        micro_batch: run the images through the stages in chunks of at most this many (None: all at once).
            On CPU the fine-scale feature buffers of a large batch outgrow the caches and the early stages
            become memory-bound; chunks keep them cache-resident. Answers are the same either way (every
            sample's path is independent in eval mode).
    """

    def __init__(self, net: EarlyExitNet, thresholds: Sequence[float], compact_fraction: float = 0.1,
                 micro_batch: Optional[int] = None, compact_in_place: bool = True):
        if not isinstance(net, EarlyExitNet):
            raise TypeError(f"EarlyExitRunner: net must be an EarlyExitNet, got {type(net).__name__}")
        t = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
        if t.numel() != net.num_exits:
            raise ValueError(f"EarlyExitRunner: thresholds has {t.numel()} entries, the net has {net.num_exits} exits")
        if not 0.0 <= compact_fraction <= 1.0:
            raise ValueError(f"EarlyExitRunner: compact_fraction must be in [0, 1], got {compact_fraction}")
        self.net = net.eval()
        self.thresholds = t
        if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
            raise ValueError(f"EarlyExitRunner: micro_batch must be a positive int or None, got {micro_batch!r}")
        self.compact_fraction = compact_fraction
        self.compact_in_place = bool(compact_in_place)
        self.micro_batch = micro_batch
        self._macs = {}

    def stage_macs(self, input_size) -> List[int]:
        """Per-sample MACs of each stage (entry k: reaching exit k beyond exit k-1; the stem is in entry 0)."""
        key = tuple(input_size)
        if key not in self._macs:
            self._macs[key] = self.net.exit_macs(key)
        return self._macs[key]

    def cumulative_macs(self, input_size) -> torch.Tensor:
        """[K] per-sample MACs of answering at exit k."""
        return torch.tensor(self.stage_macs(input_size), dtype=torch.int64).cumsum(0)

    def _chunks(self, images: torch.Tensor):
        step = self.micro_batch or max(images.shape[0], 1)
        return [images[i:i + step] for i in range(0, images.shape[0], step)] or [images]

    @staticmethod
    def _concat(results: List[EarlyExitResult]) -> EarlyExitResult:
        if len(results) == 1:
            return results[0]
        return EarlyExitResult(*(torch.cat([getattr(r, f.name) for r in results])
                                 for f in dataclasses.fields(EarlyExitResult)))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> EarlyExitResult:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"EarlyExitRunner: images must be a 4-D [N, C, H, W] tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        return self._concat([self._run(chunk) for chunk in self._chunks(images)])

    def _run(self, images: torch.Tensor) -> EarlyExitResult:
        n, num_exits = images.shape[0], self.net.num_exits
        cum = self.cumulative_macs(images.shape[1:])
        preds = torch.zeros(n, dtype=torch.long)
        exits = torch.full((n,), num_exits - 1, dtype=torch.long)
        answer_logits: Optional[torch.Tensor] = None
        rows = torch.arange(n)  # original sample of every row of the current batch
        running = torch.ones(n, dtype=torch.bool)  # rows whose sample has not been answered yet
        if n == 0:
            return EarlyExitResult(preds, exits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0))
        state = self.net.begin(images)
        for k in range(num_exits):
            state, logits = self.net.step(state, k)
            logits = logits.cpu()
            if answer_logits is None:
                answer_logits = logits.new_zeros((n, logits.shape[1]))
            accept = torch.ones(len(rows), dtype=torch.bool) if k == num_exits - 1 else \
                confidences(logits.unsqueeze(0))[0] >= self.thresholds[k]
            done = accept & running
            if done.any():
                idx = rows[done]
                preds[idx] = logits[done].argmax(dim=1)
                exits[idx] = k
                answer_logits[idx] = logits[done]
                running &= ~done
            if not running.any():
                break
            gone = len(rows) - int(running.sum())
            if gone and gone >= self.compact_fraction * len(rows):
                # shrink the batch: later stages compute only for the samples still running
                # (the first rows stay where they are; only the exited ones' places are refilled, in place)
                keep = compaction_order(running) if self.compact_in_place else torch.nonzero(running).flatten()
                state = self.net.keep(state, keep.to(images.device), reuse=self.compact_in_place)
                rows, running = rows[keep], running[keep]
        return EarlyExitResult(preds, exits, cum[exits], answer_logits)

    @torch.inference_mode()
    def anytime(self, images: torch.Tensor, exit: Optional[int] = None, budget: Optional[float] = None
                ) -> EarlyExitResult:
        """Anytime prediction: stop every sample at exit ``exit``, or at the deepest exit whose per-sample MACs
        fit in ``budget``. Stages after it are not computed."""
        num_exits = self.net.num_exits
        cum = self.cumulative_macs(images.shape[1:])
        if (exit is None) == (budget is None):
            raise ValueError("anytime: give exactly one of exit= or budget=")
        if budget is not None:
            fits = torch.nonzero(cum <= budget).flatten()
            if fits.numel() == 0:
                raise ValueError(f"anytime: budget={budget:.4g} MACs is below the first exit's {int(cum[0])}")
            exit = int(fits[-1])
        if not 0 <= exit < num_exits:
            raise ValueError(f"anytime: exit must be in [0, {num_exits}), got {exit}")
        return self._concat([self._anytime(chunk, exit, cum) for chunk in self._chunks(images)])

    def _anytime(self, images: torch.Tensor, exit: int, cum: torch.Tensor) -> EarlyExitResult:
        n = images.shape[0]
        state = self.net.begin(images)
        for k in range(exit + 1):
            state, logits = self.net.step(state, k)
        logits = logits.cpu()
        return EarlyExitResult(logits.argmax(dim=1), torch.full((n,), exit, dtype=torch.long),
                               torch.full((n,), int(cum[exit]), dtype=torch.int64), logits)
