"""How well label-free selection works, from result rows that carry both the label-free scores
and the true top-1 of every (allocation, repair) candidate: a study run with ``scoring > 0``
(``studies/evidence.toml``) stores exactly that, so the evidence needs no extra forward pass.

One *selection* is one (model, dataset, sparsity, seed): its candidates are every (allocation,
repair) row of that seed; the choice is ``api.choose`` on them (the very rule ``select`` uses),
its regret is the best candidate's top-1 minus the choice's (pt, >= 0). The fixed rules are
``api.FIXED_RULES``, chosen the same way inside their pool. Labels enter only through the
stored top-1, after every choice is made.

The issue's goal (issue #19): within 0.5 pt of the best candidate in at least 90% of
(model, sparsity) regimes, mean regret below 0.3 pt. A regime here is (model, dataset,
sparsity); its regret is the mean over its seeds, and ``per_seed`` counts single selections.

Only *complete* selections count: those holding every candidate planned for their (model,
dataset) (by default every (allocation, repair) pair the rows hold for it anywhere). The issue
asks for a choice among every allocation and every repair; a seed whose runs are not all done
is a choice among fewer candidates, and its regret says little about the full choice. Measured
on the evidence study's partial store: at 89 of 240 runs the 36 selections then in it gave
agreement 10 of 12 regimes within 0.5 pt, every miss in a seed still missing its
global-magnitude runs; at 101 runs its 12 complete selections (ResNet-20 and ResNet-56, seed
0, 24 candidates) all had zero regret under both criteria, global magnitude + reconstruct
being the best candidate in each.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
from scipy import stats

from .api import CRITERIA, FIXED_RULES, choose

WITHIN_PT = 0.5        # "within 0.5 pt of the best candidate" (issue #19)
GOAL_SHARE = 0.9       # ... "in at least 90% of (model, sparsity) regimes"
GOAL_MEAN_PT = 0.3     # ... "with mean regret below 0.3 pt"


def selections(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Group result rows into selections: {(model, dataset, sparsity, seed): candidates}, each
    candidate {"allocation", "repair", "agreement", "kl", "top1", "error": None}, ordered by
    (allocation, repair). Rows without label-free scores (a run with scoring = 0) are left out.

    Raises TypeError for a row that is not a dict, ValueError for a scored row missing one of
    ``ROW_KEYS`` or with a top1, kl or agreement that is not a finite number (a regret of NaN
    would be no result, and NaN scores make the choice depend on candidate order).
    """
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"rows must be result-row dicts (Store.rows()), got "
                            f"{type(r).__name__}: {r!r:.80}")
        if r.get("agreement") is None or r.get("kl") is None:
            continue
        missing = [k for k in ROW_KEYS if r.get(k) is None]
        if missing:
            raise ValueError(f"a result row with label-free scores lacks {missing} (every scored "
                             f"row needs {list(ROW_KEYS)}): {_where(r)}")
        values = {}
        for k in ("top1", "kl", "agreement"):
            try:
                values[k] = float(r[k])
            except (TypeError, ValueError):
                values[k] = math.nan
            if not math.isfinite(values[k]):
                raise ValueError(f"result row {_where(r)} has {k} = {r[k]!r}; selection evidence "
                                 f"needs a finite number (rerun that run or leave its row out)")
        out[_key(r)].append({"allocation": r["allocation"], "repair": r["repair"], **values,
                         "error": None})
    return {k: sorted(v, key=lambda c: (c["allocation"], c["repair"]))
            for k, v in sorted(out.items())}


ROW_KEYS = ("model", "dataset", "sparsity", "seed", "allocation", "repair", "top1")


def _where(r: Mapping) -> str:
    """One row, named for an error message."""
    return ", ".join(f"{k}={r.get(k)!r}" for k in ROW_KEYS[:6] if k in r) or repr(dict(r))


def _scored(r: Mapping) -> bool:
    return r.get("agreement") is not None and r.get("kl") is not None


def _key(r: Mapping) -> tuple:
    """The selection a row belongs to: (model, dataset, sparsity, seed)."""
    return (r["model"], r["dataset"], float(r["sparsity"]), int(r["seed"]))


def _narrowed(rows: list[dict], keep_row, enough) -> list[dict]:
    """The scored rows for which ``keep_row(row)`` holds, from the selections whose kept
    candidates' allocations (a set) satisfy ``enough``: a narrowed view that still offers a
    choice between allocations."""
    keep = [r for r in rows if _scored(r) and keep_row(r)]
    ok = {k for k, cands in selections(keep).items()
          if enough({c["allocation"] for c in cands})}
    return [r for r in keep if _key(r) in ok]


Plan = dict[tuple[str, str], set[tuple[str, str]]]


def _check_plan(plan) -> None:
    """TypeError unless ``plan`` is None or {(model, dataset): {(allocation, repair)}}."""
    if plan is None:
        return
    ok = isinstance(plan, Mapping) and all(
        isinstance(k, tuple) and len(k) == 2 and isinstance(v, (set, frozenset))
        and all(isinstance(c, tuple) and len(c) == 2 for c in v) for k, v in plan.items())
    if not ok:
        raise TypeError(f"plan must be None or {{(model, dataset): {{(allocation, repair), "
                        f"...}}}} (a dict of sets of pairs, as planned_candidates gives), got "
                        f"{plan!r:.120}")


def planned_candidates(rows: list[dict]) -> Plan:
    """{(model, dataset): {(allocation, repair)}}: every candidate the rows hold for a model and
    data set, at any sparsity and seed (rows without label-free scores left out). The default
    plan of ``summarize``; a study's report passes the study file's own plan instead, which
    also knows about allocations with no run done yet."""
    plan: Plan = defaultdict(set)
    for (model, dataset, _sp, _seed), cands in selections(rows).items():
        plan[(model, dataset)] |= {(c["allocation"], c["repair"]) for c in cands}
    return dict(plan)


def split_complete(sel: dict[tuple, list[dict]], plan: Plan
                   ) -> tuple[dict[tuple, list[dict]], dict[tuple, list[dict]]]:
    """(complete, incomplete) selections of ``sel``: complete ones hold every candidate of
    ``plan`` for their (model, dataset). A (model, dataset) the plan does not name counts as
    complete (nothing is known to be missing)."""
    complete, incomplete = {}, {}
    for key, cands in sel.items():
        want = plan.get(key[:2], set())
        have = {(c["allocation"], c["repair"]) for c in cands}
        (complete if want <= have else incomplete)[key] = cands
    return complete, incomplete


def _regret(cands: list[dict], picked: dict | None) -> float | None:
    if picked is None:
        return None
    return max(c["top1"] for c in cands) - picked["top1"]


def rule_regrets(cands: list[dict], criterion: str) -> dict[str, float | None]:
    """Regret (pt) of the label-free choice ("select") and of each fixed rule on one selection;
    None for a rule whose pool is empty (e.g. "always lamp" without LAMP candidates)."""
    i = choose(cands, criterion)
    out = {"select": _regret(cands, None if i is None else cands[i])}
    for name, (alloc, rep) in FIXED_RULES.items():
        pool = [c for c in cands if (alloc is None or c["allocation"] == alloc)
                and (rep is None or c["repair"] == rep)]
        j = choose(pool, criterion) if pool else None
        out[name] = _regret(cands, None if j is None else pool[j])
    return out


def summarize(rows: list[dict], criterion: str = "agreement", plan: Plan | None = None
              ) -> dict:
    """The selection evidence of ``rows`` (``Store.rows()`` dicts) under ``criterion``, from
    the complete selections only (``plan``: {(model, dataset): {(allocation, repair)}}, default
    ``planned_candidates(rows)``; see the module docstring for why).

    Returns {"criterion", "n_selections" (complete), "n_incomplete" (left out), "n_regimes",
    "rules": {rule: {"per_seed": {"hit", "mean", "worst", "n"}, "per_regime": {...}}} for
    "select", every ``FIXED_RULES`` entry and "hindsight: <allocation>+<repair>" (the single
    pair, among those every complete selection holds, with the lowest mean regret over the
    regimes, as the goal averages; the best any fixed pair could do; absent when no pair is in
    every selection, e.g. a pair one model lacks),
    "regimes": [{"model", "dataset", "sparsity", "seeds", "candidates", "choices", rule: mean
    regret, ...}], "misses": [{"model", "dataset", "sparsity", "seed", "chose", "chose_top1",
    "best", "best_top1", "regret"}] (each single selection whose choice is more than
    ``WITHIN_PT`` below its best candidate, pairs as "allocation+repair"), "correlation":
    {criterion: {"spearman_mean", "spearman_min", "n"}} (only the criteria with a computable
    correlation in at least one selection; {} when none), "goal_met": bool | None}. "hit" is the
    share (0-1) within ``WITHIN_PT`` of the best; regrets in pt. Spearman rank correlations are per
    selection (higher agreement and lower KL should both mean higher top-1, so KL's sign is
    flipped), then averaged; a selection whose top-1 or score is constant is skipped.
    Raises ValueError for an unknown criterion, and TypeError and ValueError as ``selections``
    (a non-dict row; a scored row missing keys or with a non-finite top1, kl or agreement);
    TypeError for a ``plan`` not of the form above.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    _check_plan(plan)
    sel, incomplete = split_complete(selections(rows),
                                     planned_candidates(rows) if plan is None else plan)
    per: dict[str, list[float]] = defaultdict(list)
    by_regime: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    choices: dict[tuple, list[str]] = defaultdict(list)
    corr: dict[str, list[float]] = defaultdict(list)
    pairs: dict[tuple[str, str], list[tuple[tuple, float]]] = defaultdict(list)
    misses = []
    for (model, dataset, sp, seed), cands in sel.items():
        for c in cands:
            pairs[(c["allocation"], c["repair"])].append(
                ((model, dataset, sp), _regret(cands, c)))
        regrets = rule_regrets(cands, criterion)
        for rule, r in regrets.items():
            if r is not None:
                per[rule].append(r)
                by_regime[(model, dataset, sp)][rule].append(r)
        i = choose(cands, criterion)
        choices[(model, dataset, sp)].append(f"{cands[i]['allocation']}+{cands[i]['repair']}")
        if regrets["select"] is not None and regrets["select"] > WITHIN_PT + 1e-9:
            best = max(cands, key=lambda c: c["top1"])
            misses.append({"model": model, "dataset": dataset, "sparsity": sp, "seed": seed,
                           "chose": f"{cands[i]['allocation']}+{cands[i]['repair']}",
                           "chose_top1": cands[i]["top1"],
                           "best": f"{best['allocation']}+{best['repair']}",
                           "best_top1": best["top1"], "regret": regrets["select"]})
        top1 = np.array([c["top1"] for c in cands])
        for crit in CRITERIA:
            score = np.array([c[crit] for c in cands]) * (-1.0 if crit == "kl" else 1.0)
            if len(cands) > 2 and np.ptp(top1) > 0 and np.ptp(score) > 0:
                corr[crit].append(float(stats.spearmanr(score, top1).statistic))

    def describe(values: list[float]) -> dict:
        if not values:
            return {"hit": None, "mean": None, "worst": None, "n": 0}
        v = np.asarray(values)
        return {"hit": float((v <= WITHIN_PT + 1e-9).mean()), "mean": float(v.mean()),
                "worst": float(v.max()), "n": int(len(v))}

    rules = ["select", *FIXED_RULES]
    # The best single (allocation, repair) pair *in hindsight*: chosen by its true regret over
    # these very selections, so a ceiling for any fixed pair (not for "always <x>", whose
    # other side the criterion still chooses), not a rule a user could know in advance.
    # Selection matching it means choosing costs nothing against the best fixed pair;
    # beating it means the best pair changes across regimes. Only pairs present in every
    # selection compete (ties: name order). Ranked by the per-regime mean (the goal's and the
    # report's "mean regret"): with regimes of unequal seed counts (a study still running) the
    # per-seed mean could crown a pair that a fixed pair beats in the report's column.
    def regime_mean(pair: tuple[str, str]) -> float:
        grouped: dict[tuple, list[float]] = defaultdict(list)
        for key, r in pairs[pair]:
            grouped[key].append(r)
        return float(np.mean([np.mean(v) for v in grouped.values()]))

    common = [p for p, v in sorted(pairs.items()) if len(v) == len(sel)]
    if common:
        best_pair = min(common, key=regime_mean)
        hindsight = f"hindsight: {best_pair[0]}+{best_pair[1]}"
        rules.append(hindsight)
        for key, r in pairs[best_pair]:
            per[hindsight].append(r)
            by_regime[key][hindsight].append(r)
    regimes = []
    for key, d in sorted(by_regime.items()):
        regimes.append({"model": key[0], "dataset": key[1], "sparsity": key[2],
                        "seeds": len(d["select"]), "candidates": len(sel[next(
                            k for k in sel if k[:3] == key)]), "choices": choices[key],
                        **{rule: float(np.mean(d[rule])) if d.get(rule) else None
                           for rule in rules}})
    summary = {rule: {"per_seed": describe(per[rule]),
                      "per_regime": describe([g[rule] for g in regimes if g[rule] is not None])}
               for rule in rules}
    reg = summary["select"]["per_regime"]
    goal = None if reg["n"] == 0 else bool(reg["hit"] >= GOAL_SHARE and
                                           reg["mean"] < GOAL_MEAN_PT)
    return {"criterion": criterion, "n_selections": len(sel), "n_incomplete": len(incomplete),
            "n_regimes": len(regimes),
            "rules": summary, "regimes": regimes,
            "misses": sorted(misses, key=lambda m: (m["model"], m["dataset"], m["sparsity"],
                                                     m["seed"])),
            "correlation": {c: {"spearman_mean": float(np.mean(v)) if v else None,
                                "spearman_min": float(np.min(v)) if v else None, "n": len(v)}
                            for c, v in corr.items()},
            "goal_met": goal}


def markdown(rows: list[dict], complete: bool = True, plan: Plan | None = None) -> list[str]:
    """The "Label-free selection" section of a study report (markdown lines), for every
    criterion, from the complete selections (``plan`` as ``summarize`` takes it); empty when
    no row carries label-free scores. ``complete=False`` (a study still running) reports the
    goal as provisional: regimes may hold fewer seeds than planned, and the selections still
    missing candidates are left out (their number is given). Ends with the allocation choice
    with the repair fixed (``allocation_choice``), when any repair offers one."""
    if not selections(rows):
        return []
    md = ["## Label-free selection (candidates: every allocation x repair of a seed; regret = "
          "best candidate's top-1 minus the rule's, pt)", "",
          f"Goal (issue #19): within {WITHIN_PT} pt of the best candidate in >= "
          f"{GOAL_SHARE:.0%} of (model, sparsity) regimes (regret averaged over seeds) with mean "
          f"regret < {GOAL_MEAN_PT} pt. Fixed rules: docs/select.md.", ""]
    for crit in CRITERIA:
        s = summarize(rows, crit, plan)
        goal = {None: "n/a", True: "met", False: "not met"}[s["goal_met"]]
        if not complete and s["goal_met"] is not None:
            goal = f"provisionally {goal} (study incomplete: not every seed is in)"
        left = (f" ({s['n_incomplete']} selection{'s' * (s['n_incomplete'] != 1)} still "
                f"missing candidates left out)" if s["n_incomplete"] else "")
        md += [f"### criterion `{crit}`: {s['n_selections']} complete selections in "
               f"{s['n_regimes']} regimes{left}; goal {goal}", ""]
        if s["n_selections"]:  # no empty tables under "0 complete selections"
            md += _tables(s)
        md += _restricted(rows, crit, plan, PAPER_ALLOCATIONS)
    return md + _allocation_choice_table(rows, plan)


def _tables(s: dict) -> list[str]:
    """The rule table, the regime table and the rank correlations of one ``summarize``."""
    md = [f"| rule | within {WITHIN_PT} pt (regimes) | mean regret | worst regret | "
          f"within {WITHIN_PT} pt (single seeds) | worst single |", "|---|---|---|---|---|---|"]
    for rule, d in s["rules"].items():
        g, p = d["per_regime"], d["per_seed"]
        if g["n"] == 0:
            continue
        md.append(f"| {rule} | {g['hit']:.0%} of {g['n']} | {g['mean']:.2f} | "
                  f"{g['worst']:.2f} | {p['hit']:.0%} of {p['n']} | {p['worst']:.2f} |")
    md += ["", "| model | dataset | sparsity | seeds | candidates | select regret | choices |",
           "|---|---|---|---|---|---|---|"]
    for g in s["regimes"]:
        md.append(f"| {g['model']} | {g['dataset']} | {g['sparsity']:g} | {g['seeds']} | "
                  f"{g['candidates']} | {g['select']:.2f} | "
                  f"{', '.join(sorted(set(g['choices'])))} |")
    if s["misses"]:
        md += ["", f"Single seeds where the choice is more than {WITHIN_PT} pt below the best "
               f"candidate:", ""]
        md += [f"- {m['model']}/{m['dataset']} {m['sparsity']:g} seed {m['seed']}: chose "
               f"{m['chose']} ({m['chose_top1']:.2f}), best {m['best']} ({m['best_top1']:.2f}), "
               f"regret {m['regret']:.2f}" for m in s["misses"]]
    corr = [f"{k} {v['spearman_mean']:.3f} [{v['spearman_min']:.3f}] (n={v['n']})"
            for k, v in s["correlation"].items() if v["n"]]
    if corr:  # none when every selection has <= 2 candidates or a constant top-1 / score
        md += ["", "Spearman rank correlation with true top-1 within a selection (KL negated), "
               "mean [min] over selections: " + "; ".join(corr)]
    return md + [""]


# The seed paper's two allocations: its question is which of them to use, and a user who
# narrows select to them (--allocations erk,lamp) faces closer candidates than the full grid.
PAPER_ALLOCATIONS = ("erk", "lamp")


def _restricted(rows: list[dict], criterion: str, plan: Plan | None,
                allocations: tuple[str, ...]) -> list[str]:
    """One line per rule of the same evidence with the candidates narrowed to ``allocations``
    (rows and plan filtered alike), from the selections holding every one of them (one with
    a single allocation offers no choice between them); nothing when no complete selection
    has them all."""
    keep = _narrowed(rows, lambda r: r["allocation"] in allocations,
                     lambda allocs: allocs >= set(allocations))
    sub = None if plan is None else {k: {c for c in v if c[0] in allocations}
                                     for k, v in plan.items()}
    s = summarize(keep, criterion, sub)
    if s["n_selections"] == 0:
        return []
    md = [f"Among {' and '.join(a.upper() for a in allocations)} only ({s['n_selections']} "
          f"complete selections in {s['n_regimes']} regimes; rule: within {WITHIN_PT} pt "
          f"(regimes), mean / worst regret):"]
    for rule, d in s["rules"].items():
        g = d["per_regime"]
        if g["n"]:
            md.append(f"- {rule}: {g['hit']:.0%} of {g['n']}, {g['mean']:.2f} / "
                      f"{g['worst']:.2f}")
    return md + [""]


def allocation_choice(rows: list[dict], plan: Plan | None = None) -> dict[str, dict]:
    """The evidence for choosing only the *allocation*, with the repair fixed: for each repair,
    each selection's candidates narrowed to that repair (one per allocation), the choice by each
    criterion, and its regret against the best allocation after that repair. This is the
    allocation search's first stage (``search_allocation(anchors="auto")`` ranks the fixed
    allocations after one repair by its criterion) and the question of a user who has settled
    on a repair.

    ``plan`` as ``summarize`` takes it, narrowed to each repair: a selection is complete when
    it holds every allocation planned with that repair (candidates planned with other repairs
    do not count).

    Returns {repair: {"n_selections", "n_regimes", criterion: {"hit", "mean", "worst", "n"}
    (per regime, as ``summarize``'s "select"), "always <allocation>": the same for that
    allocation's fixed choice (for "erk" and "lamp", when present; its "n" counts only the
    regimes holding that allocation), "hindsight": {"allocation", "mean"} (the allocation with
    the lowest mean regret over the regimes, among those in every selection; absent when none
    is)}}, for repairs with at least one complete selection holding two or more allocations;
    regrets in pt.
    """
    _check_plan(plan)
    out: dict[str, dict] = {}
    for rep in sorted({c["repair"] for cands in selections(rows).values() for c in cands}):
        keep = _narrowed(rows, lambda r, rep=rep: r["repair"] == rep,
                         lambda allocs: len(allocs) >= 2)
        sub = None if plan is None else {k: {c for c in v if c[1] == rep}
                                         for k, v in plan.items()}
        entry: dict = {}
        for crit in CRITERIA:
            s = summarize(keep, crit, sub)
            if s["n_selections"] == 0:
                break
            entry.update(n_selections=s["n_selections"], n_regimes=s["n_regimes"])
            entry[crit] = s["rules"]["select"]["per_regime"]
            for rule in ("always erk", "always lamp"):
                if s["rules"][rule]["per_regime"]["n"]:
                    entry[rule] = s["rules"][rule]["per_regime"]
            for rule, d in s["rules"].items():
                if rule.startswith("hindsight: "):
                    entry["hindsight"] = {"allocation": rule[len("hindsight: "):].split("+")[0],
                                          "mean": d["per_regime"]["mean"]}
        if entry:
            out[rep] = entry
    return out


def _allocation_choice_table(rows: list[dict], plan: Plan | None) -> list[str]:
    """The markdown of ``allocation_choice``: one row per repair; nothing when it is empty."""
    ch = allocation_choice(rows, plan)
    if not ch:
        return []

    def cell(d: dict | None, regimes: int) -> str:
        if not d or not d["n"]:
            return "-"
        # a fixed allocation absent from some regimes is judged on fewer: say so
        of = "" if d["n"] == regimes else f" ({d['n']} of {regimes} regimes)"
        return f"{d['hit']:.0%}, {d['mean']:.2f} / {d['worst']:.2f}{of}"

    md = ["### Choosing the allocation with the repair fixed (the allocation search's first "
          "stage)", "",
          f"Candidates: one repair's allocations in each complete selection; regret against "
          f"the best allocation after that repair. Cells: within {WITHIN_PT} pt (share of "
          f"regimes), mean / worst regret (pt).", "",
          "| repair | selections (regimes) | " + " | ".join(f"by {c}" for c in CRITERIA)
          + " | always erk | always lamp | best allocation in hindsight (mean) |",
          "|---" * (5 + len(CRITERIA)) + "|"]
    for rep, e in ch.items():
        h = e.get("hindsight")
        n = e["n_regimes"]
        md.append(f"| {rep} | {e['n_selections']} ({n}) | "
                  + " | ".join(cell(e.get(c), n) for c in CRITERIA)
                  + f" | {cell(e.get('always erk'), n)} | {cell(e.get('always lamp'), n)} | "
                  + ("-" if h is None else f"{h['allocation']} ({h['mean']:.2f})") + " |")
    return md + [""]
