"""Label-free selection (issue #19): for one dense model and one sparsity, prune by every
candidate allocation, repair a copy by every candidate repair on the same calibration images,
score each against the dense model on disjoint unlabeled scoring images, and choose by one
documented criterion. Labels are read only by the optional evaluation, after the choice is
fixed (docs/select.md)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..allocation import allocate, list_allocators
from ..config import _opt, check_device, config_from_dict
from ..data import calibration_set, get_spec, scoring_set
from ..evaluate import evaluate, label_free_scores, predict_logits
from ..progress import progress_bar
from ..pruning import prune_
from ..repair import list_repairs, repair
from ..run import RunConfig, check_dense, input_resolution, load_dense

CRITERIA = ("kl", "agreement")


def _run_field(name: str, help: str | None = None):
    """RunConfig's field ``name`` (its default and help text), so that a setting both entry
    points share is defined once, in RunConfig. ``help`` replaces the text where select reads
    the setting differently."""
    f = next(f for f in fields(RunConfig) if f.name == name)
    default = f.default_factory if f.default is dataclasses.MISSING else f.default
    return _opt(default, help if help is not None else f.metadata["help"])


@dataclass
class SelectConfig:
    """One selection: the single source of the defaults of ``select`` and `sparse-repair
    select` (its flags are generated from these fields). Settings it shares with a run (model,
    weights, sparsity, calibration, ...) are RunConfig's own fields, copied by ``_run_field``.

    Build it from user input with ``SelectConfig.from_dict``, which refuses unknown keys and
    names the valid ones."""
    model: str = _run_field("model")
    dataset: str = _run_field("dataset", "data set (sparse_repair.data registry); calibration "
                                         "and scoring images from its train split, the test "
                                         "split only with evaluate")
    weights: str | None = _run_field("weights")
    pretrained: bool = _run_field("pretrained")
    resolution: int | None = _run_field("resolution")
    exclude: list[str] = _run_field("exclude")
    sparsity: float = _run_field("sparsity")
    allocations: list[str] = _opt(lambda: list_allocators(),
                                  "candidate allocators (sparse_repair.allocation registry); "
                                  "default: every registered one")
    repairs: list[str] = _opt(lambda: list_repairs(),
                              "candidate repairs, each tried after every allocation: registered "
                              "methods, or labels defined in repair_options; default: every "
                              "registered method")
    repair_options: dict[str, dict] = _run_field("repair_options")
    calib: int = _run_field("calib")
    scoring: int = _opt(1000, "unlabeled scoring images: the tail of the calibration seed's "
                              "train-split permutation (data.scoring_set), disjoint from the "
                              "calibration images; never the test split")
    seed: int = _run_field("seed", "draws the calibration and the scoring images; masks do not "
                                   "depend on it")
    # agreement by default since 2026-11-30: on the evidence study KL chose a hedging repair
    # (clipped ASR, 25% top-1) over reconstruct (53%) where agreement never missed
    # (docs/select.md, "The criterion").
    criterion: str = _opt("agreement", "what chooses: 'agreement' = highest top-1 agreement with "
                                       "the dense model on the scoring images, 'kl' = lowest "
                                       "mean KL(p_dense || p_candidate); ties go to the other "
                                       "score, then to candidate order")
    device: str = _run_field("device")
    evaluate: bool = _opt(False, "after choosing, report every candidate's true top-1 on the "
                                 "test split, the choice's regret and that of fixed rules "
                                 "(labels are read only then)")
    n_eval: int | None = _opt(None, "with evaluate: stratified test subset size; None = the "
                                    "full test split")

    @classmethod
    def from_dict(cls, d: dict) -> SelectConfig:
        """A SelectConfig from a plain dict (JSON, CLI). Raises ValueError naming any unknown
        key and the valid ones, and the errors of ``check``, before anything runs."""
        return config_from_dict(cls, d, "select")

    def run_config(self, allocation: str | None = None) -> RunConfig:
        """The RunConfig of one allocation's candidates: ``load_dense``, ``input_resolution``
        and ``repair_calls`` are read through it, so a selection loads, sizes and repairs
        exactly as a run does."""
        return RunConfig(model=self.model, dataset=self.dataset,
                         allocation=allocation or self.allocations[0], sparsity=self.sparsity,
                         repairs=list(self.repairs), calib=self.calib, seed=self.seed,
                         n_eval=self.n_eval, device=self.device, weights=self.weights,
                         pretrained=self.pretrained, exclude=list(self.exclude),
                         resolution=self.resolution, repair_options=dict(self.repair_options))

    def check(self) -> list[tuple[str, str, dict]]:
        """Validate everything that can be checked without a model; returns the repair calls
        (label, method, options). Raises ValueError (TypeError for an option a repair method
        does not take) naming the problem and the fix."""
        for name in ("allocations", "repairs", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise TypeError(f"{name} must be a list of names, got {v!r}; e.g. [{v!r}]")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of "
                             f"{', '.join(CRITERIA)}")
        if not self.allocations or not self.repairs:
            raise ValueError("allocations and repairs must each name at least one candidate")
        for what, names in (("allocations", self.allocations), ("repairs", self.repairs)):
            dup = sorted({n for n in names if list(names).count(n) > 1})
            if dup:
                raise ValueError(f"{what} lists {dup} more than once; name each candidate once")
        bad = [a for a in self.allocations if a not in list_allocators()]
        if bad:
            raise ValueError(f"unknown allocation(s) {bad}; choose from "
                             f"{', '.join(list_allocators())}")
        # scoring >= 1 here (a run allows 0 = off); calib, n_eval and the rest: RunConfig.check.
        if isinstance(self.scoring, bool) or not isinstance(self.scoring, int) or \
                self.scoring < 1:
            raise ValueError(f"scoring must be a number of images >= 1, got {self.scoring!r}")
        if not isinstance(self.evaluate, bool):
            raise ValueError(f"evaluate must be true or false, got {self.evaluate!r}")
        if self.n_eval is not None and not self.evaluate:
            # n_eval only sizes the labelled evaluation; recording it on a selection that never
            # evaluates would suggest it had been used.
            raise ValueError(f"n_eval={self.n_eval!r} has no effect without evaluate; add "
                             f"evaluate=True (--evaluate) or leave n_eval at None")
        # seed, device, resolution, repairs and options: the run's own checks, once.
        run = self.run_config()
        run.check()  # resolves every repair's options too
        return run.repair_calls()


def _finite(x):
    """None for a missing or non-finite number: the JSON of a selection never holds NaN."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class SelectResult:
    """What ``select`` returns. ``candidates``: one dict per (allocation, repair) in candidate
    order (allocations outer, repairs inner) with "allocation", "repair", "method",
    "agreement" (percent), "kl" (nats), "seconds" (prune share excluded: repair + scoring),
    "collapsed" (layers the allocation left with zero weights) and "error" (None, or the
    exception that made the candidate unscorable), plus "top1" (percent) with evaluate.
    ``choice``: {"allocation", "repair"}, None when no candidate could be scored.
    ``margin``: how far the choice is ahead of the runner-up on the scoring images
    (``choice_margin``), None with fewer than two scored candidates.
    ``evaluation``: None unless cfg.evaluate (see ``to_dict``)."""
    choice: dict | None
    criterion: str
    candidates: list[dict]
    seconds: float
    config: dict
    evaluation: dict | None = None
    margin: dict | None = None

    def to_dict(self) -> dict:
        """{"choice", "criterion", "margin", "candidates", "seconds", "config"}, and with
        evaluate also "dense_top1", "n_eval", "best", "regret" (pt) and "fixed_rules"
        (docs/select.md); missing numbers are None, never NaN."""
        out = {"choice": self.choice, "criterion": self.criterion, "margin": self.margin,
               "candidates": [dict(c) for c in self.candidates], "seconds": self.seconds,
               "config": self.config}
        if self.evaluation is not None:
            out.update(self.evaluation)
        return out

    def table(self) -> str:
        """The printed form: one line per candidate (label-free scores, top-1 with evaluate,
        seconds, error), the choice marked with '*', then the regrets when evaluated."""
        ev = self.evaluation is not None

        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        lines = [f"# criterion {self.criterion}: "
                 + ("lowest mean KL(p_dense || p)" if self.criterion == "kl"
                    else "highest top-1 agreement with the dense model"),
                 f"  {'allocation':<17} {'repair':<12} {'agree %':>7} {'KL nats':>8}"
                 + (f" {'top1 %':>7}" if ev else "") + f" {'seconds':>8}  error"]
        for c in self.candidates:
            mark = "*" if self.choice == {"allocation": c["allocation"],
                                          "repair": c["repair"]} else " "
            lines.append(f"{mark} {c['allocation']:<17} {c['repair']:<12} "
                         f"{num(c['agreement'], '7.2f'):>7} {num(c['kl'], '8.4f'):>8}"
                         + (f" {num(c.get('top1'), '7.2f'):>7}" if ev else "")
                         + f" {num(c['seconds'], '8.2f'):>8}  {c['error'] or ''}".rstrip())
        lines.append("choice: " + ("none (every candidate failed)" if self.choice is None else
                                   f"{self.choice['allocation']} + {self.choice['repair']}")
                     + f"  [{self.seconds:.1f}s]")
        m = self.margin
        if m is not None:
            unit = "pt agreement" if m["criterion"] == "agreement" else "nats KL"
            ci = "" if m["ci95"] is None else \
                f" [95% CI {m['ci95'][0]:+.4g}, {m['ci95'][1]:+.4g}]"
            lines.append(
                f"margin over the runner-up {m['runner_up']['allocation']} + "
                f"{m['runner_up']['repair']}: {m['difference']:+.4g} {unit}{ci} on {m['n']} "
                f"scoring images: " + ("resolved" if m["resolved"] else
                                       "not resolved; more scoring images (--scoring) may "
                                       "change the choice"))
        if ev:
            e = self.evaluation
            best = e["best"]
            lines.append(f"dense top-1 {e['dense_top1']:.2f}% on {e['n_eval']} test images; "
                         + ("no candidate evaluated" if best is None else
                            f"best {best['allocation']} + {best['repair']} "
                            f"{best['top1']:.2f}%; regret of the choice "
                            f"{num(e['regret'], '.2f')} pt"))
            absent = []
            for name, r in e["fixed_rules"].items():
                if r["choice"] is None and r["note"] == "not among the candidates":
                    absent.append(name)  # a rule about candidates the user did not ask for
                    continue
                lines.append(f"  {name:<18} " + (r["note"] if r["choice"] is None else
                             f"{r['choice']['allocation']} + {r['choice']['repair']}: "
                             f"top-1 {r['top1']:.2f}%, regret {num(r['regret'], '.2f')} pt"))
            if absent:
                lines.append(f"  (no candidate for {', '.join(absent)})")
        return "\n".join(lines)


def _rank_key(criterion: str):
    """Sort key of a scored candidate (lower = better): the criterion, then the other score,
    then candidate order (the index is the last element of each item)."""
    if criterion == "kl":
        return lambda ic: (ic[1]["kl"], -ic[1]["agreement"], ic[0])
    return lambda ic: (-ic[1]["agreement"], ic[1]["kl"], ic[0])


def choice_margin(candidates: list[dict], per_image: list[dict | None], choice: int | None,
                  criterion: str) -> dict | None:
    """How far the choice is ahead of the runner-up (the candidate ``choose`` would pick
    without it), paired image by image on the scoring images.

    ``per_image[i]``: ``label_free_scores(..., per_image=True)["per_image"]`` of candidate i
    (float64 [N] per criterion), None for a failed candidate. Returns None with fewer than two
    scored candidates, else {"runner_up": {"allocation", "repair"}, "criterion", "difference":
    mean over images of the choice's score minus the runner-up's, signed so that > 0 means the
    choice is better (agreement in pt, KL in nats), "ci95": [lo, hi] (the 95% paired
    t-interval, ``scipy.stats.ttest_1samp``; None for one image or where it overflows; [d, d]
    when every image gives the same difference d, [0, 0] when d is within rounding of 0),
    "n" (images), "resolved": the interval excludes 0}.

    Why: the study's missed selections were candidates 1.5-3.4 pt apart in true top-1 whose
    agreement on 1,000 scoring images differed by about one point, and more images fixed them
    (docs/RESULTS.md 0b, the scoring probe); a user should see when a choice is within noise.
    """
    from scipy import stats

    if choice is None:
        return None
    others = [i for i, c in enumerate(candidates) if c["error"] is None and i != choice]
    if not others:
        return None
    j = others[choose([candidates[i] for i in others], criterion)]
    a, b = per_image[choice][criterion], per_image[j][criterion]
    d = ((a - b) if criterion == "agreement" else (b - a)).double().numpy()
    mean = float(d.mean())
    tol = 1e-12 * max(1.0, float(abs(d).max()))
    if len(d) < 2 or not math.isfinite(mean):  # non-finite values: no interval, never [0, 0]
        ci = None
    elif float(d.max() - d.min()) <= tol:
        # the same difference on every image, to rounding; one within rounding of 0 is 0
        ci = [mean, mean] if abs(mean) > tol else [0.0, 0.0]
    else:
        r = stats.ttest_1samp(d, 0.0).confidence_interval(confidence_level=0.95)
        ci = [float(r.low), float(r.high)]
        if not all(math.isfinite(x) for x in ci):  # overflow: never NaN/Inf in the JSON
            ci = None
    return {"runner_up": {"allocation": candidates[j]["allocation"],
                          "repair": candidates[j]["repair"]},
            "criterion": criterion, "difference": _finite(mean),
            "ci95": ci, "n": int(len(d)), "resolved": bool(ci is not None and ci[0] > 0)}


def choose(candidates: list[dict], criterion: str) -> int | None:
    """Index of the candidate the criterion picks among those without an error (ties: the other
    score, then the earlier candidate); None when every candidate failed. Reads only
    "agreement", "kl" and "error": no label reaches it."""
    scored = [(i, c) for i, c in enumerate(candidates) if c["error"] is None]
    if not scored:
        return None
    return min(scored, key=_rank_key(criterion))[0]


# The fixed rules an evaluated selection is compared with (issue #19): what a user without a
# selection would do. "always X" fixes one side and lets the criterion choose the other.
# "always reconstruct": the repair the evidence study finds best in every (model, allocation,
# sparsity) cell on canonical CIFAR-10 (docs/repair.md), so the rule a reader of our docs would
# follow without a selection; the criterion then picks only the allocation.
FIXED_RULES = {"always erk": ("erk", None), "always lamp": ("lamp", None),
               "always bn_recal": (None, "bn_recal"), "always reconstruct": (None, "reconstruct"),
               "erk+bn_recal": ("erk", "bn_recal"), "lamp+bn_recal": ("lamp", "bn_recal")}


def _evaluation(cfg: SelectConfig, candidates: list[dict], choice: int | None,
                dense_top1: float, n: int) -> dict:
    scored = [c for c in candidates if c["error"] is None]
    best = max(scored, key=lambda c: c["top1"]) if scored else None  # ties: earlier candidate

    def regret(c):
        # top-1 values are exact percentages of n images (count * 100 / n); rounding the
        # difference to 10 decimals removes float noise (1.2999999999999972 -> 1.3) only
        return None if c is None or best is None else _finite(
            round(best["top1"] - c["top1"], 10))

    def pair(c):
        return None if c is None else {"allocation": c["allocation"], "repair": c["repair"]}

    rules = {}
    for name, (alloc, rep) in FIXED_RULES.items():
        pool = [c for c in candidates if (alloc is None or c["allocation"] == alloc)
                and (rep is None or c["repair"] == rep)]
        i = choose(pool, cfg.criterion) if pool else None
        c = None if i is None else pool[i]
        rules[name] = {"choice": pair(c), "top1": None if c is None else c["top1"],
                       "regret": regret(c),
                       "note": None if c is not None else
                       ("not among the candidates" if not pool else "every candidate failed")}
    chosen = None if choice is None else candidates[choice]
    return {"dense_top1": dense_top1, "n_eval": n,
            "best": None if best is None else {**pair(best), "top1": best["top1"]},
            "regret": regret(chosen), "fixed_rules": rules}


def select(cfg: SelectConfig, dense: torch.nn.Module | None = None, progress: bool = False
           ) -> SelectResult:
    """Choose an (allocation, repair) for ``cfg.model`` at ``cfg.sparsity`` without labels.

    Steps: load the dense model (``run.load_dense``; or use ``dense``), draw ``cfg.calib``
    calibration images and ``cfg.scoring`` disjoint scoring images from the train split
    (``data.calibration_set`` / ``data.scoring_set``, the same seed), compute the dense logits
    on the scoring images once; then per allocation prune a copy once (``allocate`` +
    ``prune_``) and per repair repair a deep copy of it on the calibration images
    (``repair.repair``, dense model given) and score it (``evaluate.label_free_scores``: top-1
    agreement in percent, mean KL(p_dense || p_candidate) in nats). A candidate whose
    allocation, repair or scoring raises is kept with its "error" and never chosen. The choice
    is ``choose(candidates, cfg.criterion)``. Only then, with ``cfg.evaluate``, every candidate
    and the dense model are evaluated on the test split (``evaluate.evaluate``, ``cfg.n_eval``
    images) and the regrets computed.

    ``progress`` draws one tqdm bar over the candidates (with ETA) on stderr. A ``dense``
    passed in is used in eval mode on ``cfg.device`` and handed back in the mode and on the
    device it came in; its weights are never changed (candidates are pruned copies). The
    result's ``seconds`` is the whole call (s), loading and evaluation included.
    Raises, before any candidate runs: the errors of ``SelectConfig.check``, of
    ``data.scoring_set`` (calib + scoring above the train split), ``run.check_dense`` (a
    ``dense`` of another architecture or dtype), ``run.load_dense`` and
    ``weights.check_weights_fit`` (weights that do not fit the data set)."""
    start = time.perf_counter()
    calls = cfg.check()
    run_cfg = cfg.run_config()
    resolution = input_resolution(run_cfg)
    spec = get_spec(cfg.dataset)
    check_device(cfg.device, available=True)
    if dense is not None:
        check_dense(run_cfg, dense)
    given = dense
    was_training = given.training if given is not None else None
    was_on = next(given.parameters(), torch.empty(0)).device if given is not None else None
    dense = (dense if dense is not None else load_dense(run_cfg)).to(cfg.device).eval()
    try:
        return _select(cfg, dense, calls, run_cfg, resolution, spec, start, progress)
    finally:
        if given is not None:  # the caller's model leaves in the mode and on the device
            given.train(was_training).to(was_on)  # it came in


def _select(cfg, dense, calls, run_cfg, resolution, spec, start, progress) -> SelectResult:
    import warnings

    from ..weights import check_weights_fit

    # A layer name in exclude that is not prunable is a user error, not a candidate failure:
    # one allocation (weights only read) raises it before any candidate runs. Uniform, not the
    # first candidate: an allocator that refuses this sparsity (uniform_plus, lamp) is a
    # candidate failure, listed with its error, not a failed call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collapse is reported per candidate below
        allocate(dense, "uniform", cfg.sparsity, exclude=cfg.exclude)
    check_weights_fit(dense, cfg.dataset, spec.num_classes,
                      resolution if resolution is not None else spec.default_resolution)
    # scoring_set first: it refuses calib + scoring above the train split before any decoding.
    scoring = scoring_set(cfg.dataset, cfg.scoring, cfg.seed, calib=cfg.calib,
                          resolution=resolution).to(cfg.device)
    calib = calibration_set(cfg.dataset, cfg.calib, cfg.seed, resolution=resolution
                            ).to(cfg.device)
    # One dense pass over the scoring images, shared by every candidate. The dense side of each
    # repair's paired calibration pass is recomputed by repair() per candidate (docs/select.md,
    # "Cost").
    dense_logits = predict_logits(dense, scoring)
    keep_models = cfg.evaluate
    models: list[torch.nn.Module | None] = []
    candidates: list[dict] = []
    per_image: list[dict | None] = []  # the scores image by image, for choice_margin
    bar = progress_bar(len(cfg.allocations) * len(calls), "select", enabled=progress,
                       unit="cand")
    for alloc_name in cfg.allocations:
        pruned, collapsed, alloc_error = None, [], None
        try:
            pruned = copy.deepcopy(dense)
            alloc = allocate(pruned, alloc_name, cfg.sparsity, exclude=cfg.exclude)
            prune_(pruned, alloc)
            collapsed = list(alloc.collapsed)
        except Exception as e:  # reported on each of its candidates, never chosen
            alloc_error = f"allocation failed: {type(e).__name__}: {e}"
        for label, method, opts in calls:
            t0 = time.perf_counter()
            row = {"allocation": alloc_name, "repair": label, "method": method,
                   "agreement": None, "kl": None, "seconds": None, "collapsed": collapsed,
                   "error": alloc_error}
            model, each = None, None
            if alloc_error is None:
                try:
                    model = copy.deepcopy(pruned)
                    repair(model, method, calib, dense=dense, **opts)
                    scores = label_free_scores(predict_logits(model, scoring), dense_logits,
                                               per_image=True)
                    row["agreement"], row["kl"] = _finite(scores["agreement"]), \
                        _finite(scores["kl"])
                    each = scores["per_image"]
                except Exception as e:  # refused on this architecture, not finite, ...
                    row["error"], model, each = f"{type(e).__name__}: {e}", None, None
                row["seconds"] = time.perf_counter() - t0
            candidates.append(row)
            per_image.append(each)
            # Kept (on the CPU) only for the labelled evaluation after the choice.
            models.append(model.cpu() if keep_models and model is not None else None)
            bar.update(1)
        del pruned
    choice_index = choose(candidates, cfg.criterion)
    choice = None if choice_index is None else {
        "allocation": candidates[choice_index]["allocation"],
        "repair": candidates[choice_index]["repair"]}
    margin = choice_margin(candidates, per_image, choice_index, cfg.criterion)
    evaluation = None
    if cfg.evaluate:
        # Labels are read from here on only: the choice above is already fixed.
        ev = evaluate(dense, cfg.dataset, cfg.n_eval, device=cfg.device, resolution=resolution)
        for row, model in zip(candidates, models):
            row["top1"] = None if model is None else evaluate(
                model, cfg.dataset, cfg.n_eval, device=cfg.device, resolution=resolution)["top1"]
        evaluation = _evaluation(cfg, candidates, choice_index, ev["top1"], ev["n"])
    return SelectResult(choice=choice, criterion=cfg.criterion, candidates=candidates,
                        seconds=time.perf_counter() - start, config=asdict(cfg),
                        evaluation=evaluation, margin=margin)
