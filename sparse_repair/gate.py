"""The benchmark gate: compare a regime's measurements with its stored baseline. Pure functions
on numbers, so the gate itself is unit-tested on doctored measurements (benchmarks/
test_gate_logic.py). The regime classes are `sparse_repair.regime`'s."""

from __future__ import annotations

from dataclasses import dataclass

from .regime import classify_regime, recovering_repairs  # noqa: F401  (classify: re-exported)


@dataclass
class Verdict:
    regime: str
    check: str            # a repair name, or "margin <repair>-bn_recal"
    measured: float
    baseline: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.measured >= self.baseline - self.tolerance

    @property
    def delta(self) -> float:
        return self.measured - self.baseline

    def message(self) -> str:
        word = "ok" if self.ok else "REGRESSION"
        return (f"{word}: regime {self.regime}, {self.check}: measured {self.measured:.2f} vs "
                f"baseline {self.baseline:.2f} ({self.delta:+.2f} pt, tolerance "
                f"{self.tolerance:.2f} pt)")


def compare(regime: str, measured: dict[str, float], baseline: dict) -> list[Verdict]:
    """Verdicts for every repair in the baseline plus, for transition regimes, the stored
    margins over bn_recal that define the regime: asr's (the seed paper's backend) and that of
    the baseline's best recovering repair (``regime.recovering_repairs``), which is what makes
    the regime a transition one (resnet20/cifar10/erk/0.97 is one only through reconstruct:
    42.60 against bn_recal 12.25)."""
    tol = float(baseline.get("tolerance_pt", 0.5))
    out = []
    for method, base in baseline["top1"].items():
        if method not in measured:
            raise KeyError(f"regime {regime}: no measurement for {method}")
        out.append(Verdict(regime, method, measured[method], base, tol))
    if baseline.get("class") == "transition":
        base = baseline["top1"]
        rec = [r for r in recovering_repairs() if r in base]
        for r in dict.fromkeys([r for r in ("asr",) if r in base] +
                               ([max(rec, key=base.get)] if rec else [])):
            out.append(Verdict(regime, f"margin {r}-bn_recal",
                               measured[r] - measured["bn_recal"], base[r] - base["bn_recal"],
                               tol))
    return out


def format_table(rows: list[Verdict]) -> str:
    head = f"{'regime':<44} {'check':<20} {'measured':>8} {'baseline':>8} {'tol':>5}  verdict"
    lines = [head, "-" * len(head)]
    for v in rows:
        lines.append(f"{v.regime:<44} {v.check:<20} {v.measured:>8.2f} {v.baseline:>8.2f} "
                     f"{v.tolerance:>5.2f}  {'pass' if v.ok else 'FAIL'}")
    return "\n".join(lines)
