"""The regime rule, once: the benchmark gate (`sparse_repair.gate`, benchmarks/) and the study
report (`sparse_repair.study`) both classify with these functions, so a regime means the same
thing in a baseline file and in a report.

    chance     = 100 / num_classes;  fail = FAIL_FACTOR * chance    (percent top-1)
    mild       bn_recal >= dense - MILD_GAP_PT
    collapse   every repair < fail
    transition bn_recal < fail, best recovering repair >= fail and >= bn_recal + RECOVERY_MARGIN_PT
    degraded   anything else (bn_recal well below dense but not failing)

A *recovering repair* is any registered repair beyond BatchNorm recalibration: every family but
"none" and "bn" (today the activation-statistics repairs layerwise, channelwise, asr and
clipped_asr, and layer-wise reconstruction, reconstruct, issue #17). Source: the transition regime
of arXiv 2605.21972 (BN-only repair fails while an activation-statistic repair recovers); the
2 x chance and 5-pt thresholds are this project's reading of "fails" and "recovers"
(benchmarks/README.md). The study report also reads the rule with one recovering repair at a
time (``study.report_writer``: where that repair recovers while bn_recal fails).
"""

from __future__ import annotations

from .repair import REPAIRS

FAIL_FACTOR = 2.0          # bn_recal below this multiple of chance -> "fails"
MILD_GAP_PT = 5.0          # bn_recal within this many points of dense -> mild
RECOVERY_MARGIN_PT = 5.0   # transition: best recovering repair this far above bn_recal


def recovering_repairs() -> list[str]:
    """Registered repairs that count as recovering where bn_recal fails, in registry order."""
    return [name for name, m in REPAIRS.items() if m.family not in ("none", "bn")]


def fail_threshold(num_classes: int) -> float:
    """Top-1 (percent) below which a repair has failed: FAIL_FACTOR x chance."""
    return FAIL_FACTOR * 100.0 / num_classes


def is_transition(top1: dict[str, float], num_classes: int, fail: float | None = None,
                  recovery_margin: float = RECOVERY_MARGIN_PT) -> bool:
    """bn_recal fails while the best recovering repair in ``top1`` (repair -> percent) does not
    and beats bn_recal by ``recovery_margin`` points. False when either side is missing."""
    fail = fail_threshold(num_classes) if fail is None else fail
    rec = [top1[r] for r in recovering_repairs() if r in top1]
    if "bn_recal" not in top1 or not rec:
        return False
    best, bn = max(rec), top1["bn_recal"]
    return bn < fail and best >= fail and best >= bn + recovery_margin


def classify_regime(dense_top1: float, top1: dict[str, float], num_classes: int) -> str:
    """"mild", "collapse", "transition" or "degraded" for one pruned model, from its dense
    top-1 and the top-1 of each repair (percent; must include bn_recal)."""
    if top1["bn_recal"] >= dense_top1 - MILD_GAP_PT:
        return "mild"
    if max(top1.values()) < fail_threshold(num_classes):
        return "collapse"
    if is_transition(top1, num_classes):
        return "transition"
    return "degraded"
