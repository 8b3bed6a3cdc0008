"""The regime set of the accuracy gate. A regime is one pruned model; its id names every
choice that changes the numbers. Add a regime here, then record its baseline with
``pytest benchmarks/test_repair_accuracy.py --update-baselines -k '<id>'``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    model: str
    dataset: str
    allocation: str
    sparsity: float
    weights: str | None = None      # repo-relative checkpoint; None = published weights
    calib: int = 1024               # calibration images
    seed: int = 0                   # calibration draw
    n_eval: int | None = 2000       # stratified subset; None = full split
    needs_assets: bool = True
    nightly_only: bool = False      # heavy regimes run with --nightly (CI keeps ~10 min)

    @property
    def id(self) -> str:
        ev = "full" if self.n_eval is None else f"n{self.n_eval}"
        return (f"{self.model}/{self.dataset}/{self.allocation}/{self.sparsity}/"
                f"c{self.calib}s{self.seed}/{ev}")


REPAIRS = ["none", "bn_recal", "layerwise", "channelwise", "asr", "clipped_asr"]

# Embedded default: runs anywhere (scikit-learn's digits + our committed checkpoint).
DIGITS = [Regime("resnet8", "digits", a, s, "baselines/checkpoints/resnet8-digits.pt",
                 calib=512, n_eval=None, needs_assets=False)
          for a in ("erk", "lamp") for s in (0.8, 0.9, 0.95)]

# Shared assets: pretrained CIFAR ResNets on cifar10-jpeg.
# ResNet-56 costs ~100 s per regime on 2 cores (seven 2,000-image evaluations), so the default
# run keeps its 0.9 regimes and --nightly adds 0.8 and 0.95.
CIFAR = [Regime(m, "cifar10-jpeg", a, s, nightly_only=(m == "resnet56" and s != 0.9))
         for m in ("resnet20", "resnet56") for a in ("erk", "lamp") for s in (0.8, 0.9, 0.95)]

ALL = DIGITS + CIFAR
