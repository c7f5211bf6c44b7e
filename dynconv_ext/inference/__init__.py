"""Early-exit inference: MSDNet's threshold calibration and a runtime in which exited samples leave the batch.

    from dynconv_ext import models
    from dynconv_ext.inference import calibrate_thresholds, EarlyExitRunner

    net = models.msdnet_cifar(num_classes=100).eval()
    th = calibrate_thresholds(net, val_loader, prior=0.9)   # q_k ∝ 0.9^k
    run = EarlyExitRunner(net, th)
    out = run(images)            # out.predictions, out.exits, out.macs (per sample), out.logits
    out = run.anytime(images, exit=2)  # or budget=<MACs per sample>
"""
from .calibration import (calibrate_thresholds, collect_logits, confidences, exit_prior, simulate_exits,
                          thresholds_from_confidences)
from .runtime import EarlyExitResult, EarlyExitRunner

__all__ = ["calibrate_thresholds", "collect_logits", "confidences", "exit_prior", "simulate_exits",
           "thresholds_from_confidences", "EarlyExitRunner", "EarlyExitResult"]
