"""Study runner: stable grid ids, resume, crash safety, statistics and regime detection."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_repair.study.spec import load_study
from sparse_repair.study.stats import (
    MIN_SEEDS_FOR_SIGNIFICANCE,
    PairedDiff,
    describe_interval,
    paired_diffs,
    paired_t_interval,
    transition_interval,
)
from sparse_repair.study.store import Store

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt"


def _study(tmp_path: Path, sparsities=(0.8, 0.9), seeds=(0,), repairs=("none", "bn_recal"),
           name="t") -> Path:
    f = tmp_path / f"{name}.toml"
    f.write_text(f'''name = "{name}"
calib = 128
n_eval = "full"
seeds = {list(seeds)}
allocations = ["erk", "lamp"]
sparsities = {list(sparsities)}
repairs = {list(repairs)!r}
[[models]]
model = "resnet8"
dataset = "digits"
weights = "{CKPT.as_posix()}"
'''.replace("'", '"'))
    return f


def test_grid_expansion_and_ids_are_stable(tmp_path):
    a = load_study(_study(tmp_path))
    b = load_study(_study(tmp_path))
    assert len(a.runs) == 4, "2 allocations x 2 sparsities x 1 seed"
    assert [r for r, _ in a.runs] == [r for r, _ in b.runs], "ids must not change between loads"
    assert len({r for r, _ in a.runs}) == 4, "ids must be unique per run"
    c = load_study(_study(tmp_path, repairs=("none", "bn_recal", "asr")))
    assert [r for r, _ in a.runs] == [r for r, _ in c.runs], \
        "the repair list is not part of a run's identity"


def test_runs_go_seed_major_across_models(tmp_path):
    """A study stopped part-way holds whole grids of every model for its first seeds: seed
    outermost, then model (file order), then allocation, then sparsity."""
    f = _study(tmp_path, seeds=(0, 1))
    f.write_text(f.read_text() + f'[[models]]\nmodel = "resnet8"\ndataset = "digits"\n'
                 f'weights = "{CKPT.as_posix()}"\nseeds = [0, 1]\ncalib = 64\n')
    runs = [cfg for _, cfg in load_study(f).runs]
    assert [(c.seed, c.calib, c.allocation, c.sparsity) for c in runs] == [
        (s, calib, a, sp) for s in (0, 1) for calib in (128, 64) for a in ("erk", "lamp")
        for sp in (0.8, 0.9)]


def test_run_ids_do_not_depend_on_where_the_checkpoint_lies(tmp_path):
    import shutil

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for suffix in ("", ".json"):
        shutil.copy(str(CKPT) + suffix, moved / (CKPT.name + suffix))
    here = load_study(_study(tmp_path))
    text = _study(tmp_path).read_text().replace(CKPT.as_posix(), (moved / CKPT.name).as_posix())
    there = tmp_path / "there.toml"
    there.write_text(text)
    assert [r for r, _ in load_study(there).runs] == [r for r, _ in here.runs], (
        "the same checkpoint at another path (another machine, a cluster node) must give the "
        "same run ids, or resuming there recomputes everything")


def test_a_checkpoint_written_later_in_the_process_gets_its_own_identity(tmp_path):
    """The identity (name and content hash) is cached per file state, never for a missing
    file: a checkpoint created or replaced after a first run in the same process (a notebook)
    is named by its current content, and a missing one by its file name only, never by this
    machine's path."""
    import shutil

    from sparse_repair.study.spec import _weights_identity, stored_config

    path = tmp_path / "w" / CKPT.name
    missing = stored_config({"weights": str(path)})["weights"]
    assert missing == f"{CKPT.name}:not found here", missing
    path.parent.mkdir()
    shutil.copy(CKPT, path)
    first = _weights_identity(str(path))
    assert first.startswith(f"{CKPT.name}:") and str(tmp_path) not in first
    assert stored_config({"weights": str(path)})["weights"] == first
    path.write_bytes(path.read_bytes() + b"\0")  # replaced in place: other content
    os.utime(path, ns=(1, 1))
    assert _weights_identity(str(path)) != first, "a stale hash named the old content"


def test_resolution_is_part_of_a_run_only_when_set():
    import hashlib
    import json

    from sparse_repair.run import RunConfig
    from sparse_repair.study.spec import run_id

    # The id scheme before `resolution` existed: sha1 of the sorted config without repairs.
    # An unset resolution must keep those ids, or resuming older studies recomputes every run.
    # (repair_options and scoring came later still and are dropped from the id when empty/0.)
    base = RunConfig(model="resnet20", allocation="erk", sparsity=0.9)
    old = {k: v for k, v in base.__dict__.items()
           if k not in ("repairs", "resolution", "repair_options", "scoring")}
    expected = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert run_id(base) == expected, "run ids of existing studies changed"
    assert run_id(base) != run_id(RunConfig(**{**base.__dict__, "resolution": 64})), \
        "a run at another input resolution is another run"
    assert run_id(base) != run_id(RunConfig(**{**base.__dict__, "scoring": 1000})), \
        "a run that records label-free scores has other rows, so it is another run"


def test_input_resolution_comes_from_the_checkpoint_sidecar():
    from sparse_repair.run import RunConfig, input_resolution

    cfg = RunConfig(model="resnet8", dataset="digits", weights=str(CKPT))
    assert input_resolution(cfg) == 8, "a trained checkpoint is evaluated at its training size"
    assert input_resolution(RunConfig(**{**cfg.__dict__, "resolution": 16})) == 16
    assert input_resolution(RunConfig(model="resnet20")) is None, "published weights: default"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sparse_repair.cli", "study", *args],
                          capture_output=True, text=True, cwd=ROOT, **kw)


def _created(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT run_id || repair, created FROM results"))


def test_resume_skips_finished_runs(tmp_path):
    study, db = _study(tmp_path), tmp_path / "r.sqlite"
    assert _cli("run", str(study), "--db", str(db)).returncode == 0
    first = _created(db)
    r = _cli("run", str(study), "--db", str(db))
    assert "0 to run" in r.stdout, r.stdout
    assert _created(db) == first, "a resumed study must not recompute finished runs"


def test_kill_mid_sweep_loses_nothing_finished(tmp_path):
    study = _study(tmp_path, sparsities=(0.7, 0.8, 0.85, 0.9, 0.95), seeds=(0, 1), name="k")
    db = tmp_path / "k.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "sparse_repair.cli", "study", "run",
                             str(study), "--db", str(db)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done_before = set()
    while time.time() < deadline:
        if db.exists():
            with sqlite3.connect(db) as c:
                done_before = {r[0] for r in c.execute(
                    "SELECT run_id FROM runs WHERE status='done'")}
            if len(done_before) >= 2:
                break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done_before) < 20, "the kill should land mid-sweep"
    kept = _created(db)
    r = _cli("run", str(study), "--db", str(db))
    assert r.returncode == 0, r.stderr
    after = _created(db)
    assert all(after[k] == v for k, v in kept.items()), "finished runs were recomputed or lost"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 20


def test_paired_t_interval_contains_true_difference():
    rng = np.random.default_rng(0)
    diffs = 3.0 + rng.normal(0, 1, size=30)
    lo, hi, p = paired_t_interval(diffs)
    assert lo < 3.0 < hi and lo > 0, f"interval [{lo:.2f}, {hi:.2f}] should cover 3, exclude 0"
    assert p < 1e-6, f"a 3-sd shift over 30 seeds must have a tiny p-value, got {p}"


def _diff_rows(diffs, base=50.0):
    """Rows whose lamp - erk top-1 difference in seed i is diffs[i] (paired on seed)."""
    rows = []
    for seed, d in enumerate(diffs):
        common = {"model": "m", "dataset": "d", "sparsity": 0.9, "repair": "asr", "seed": seed}
        rows += [dict(common, allocation="erk", top1=base + seed),
                 dict(common, allocation="lamp", top1=base + seed + d)]
    return rows


def _lamp_minus_erk(diffs) -> PairedDiff:
    (d,) = paired_diffs(_diff_rows(diffs), "allocation", "lamp", "erk",
                        ("model", "dataset", "sparsity", "repair"))
    return d


def test_three_seed_interval_is_the_t_interval_not_the_bootstrap_range():
    # Old behaviour: a percentile bootstrap over 3 seeds lies inside [min, max] = [1, 3] and was
    # flagged significant. The t-interval is mean ± t_{0.975,2} * sd / sqrt(n) = 2 ± t / sqrt(3).
    # For 2 degrees of freedom t_q = (2q - 1) / sqrt(2q(1 - q)) in closed form (Student's t
    # with nu = 2), and the two-sided p of t-statistic T is 1 - T / sqrt(2 + T^2).
    t_q = 0.95 / np.sqrt(2 * 0.975 * 0.025)
    assert abs(t_q - 4.302652729911275) < 1e-6
    lo, hi, p = paired_t_interval([1.0, 2.0, 3.0])
    assert abs(lo - (2 - t_q / np.sqrt(3))) < 1e-9 and abs(hi - (2 + t_q / np.sqrt(3))) < 1e-9
    assert abs(lo - -0.484) < 1e-3 and abs(hi - 4.484) < 1e-3, (lo, hi)
    t_stat = 2 / (1 / np.sqrt(3))
    assert abs(p - (1 - t_stat / np.sqrt(2 + t_stat ** 2))) < 1e-9, p
    d = _lamp_minus_erk([1.0, 2.0, 3.0])
    assert (d.lo, d.hi, d.p) == (lo, hi, p) and d.n == 3 and abs(d.mean - 2.0) < 1e-9
    assert not d.significant, f"[1, 2, 3] flagged: interval [{d.lo}, {d.hi}]"


def test_five_seeds_clear_shift_is_significant_and_noise_is_not():
    assert MIN_SEEDS_FOR_SIGNIFICANCE == 5
    d = _lamp_minus_erk([4.8, 5.1, 5.0, 4.9, 5.2])
    assert d.n == 5 and d.lo > 0 and d.significant, (d.lo, d.hi, d.p)
    noise = _lamp_minus_erk(list(np.random.default_rng(1).normal(0, 1, size=5)))
    assert noise.lo < 0 < noise.hi and not noise.significant, (noise.lo, noise.hi, noise.p)


def test_fewer_than_five_seeds_are_never_flagged():
    for diffs in ([50.0, 51.0, 49.0], [50.0, 50.5, 49.5, 50.2]):
        d = _lamp_minus_erk(diffs)
        assert d.lo > 0, "the interval itself excludes 0 for a huge consistent shift"
        assert not d.significant, f"{len(diffs)} seeds flagged significant"


def test_one_seed_and_constant_differences_give_no_nan():
    assert paired_t_interval([2.5]) == (None, None, None)
    d = _lamp_minus_erk([2.5])
    assert (d.lo, d.hi, d.p, d.n, d.significant) == (None, None, None, 1, False)
    # Both repairs at chance in every seed: scipy's t is 0/0; no evidence of a difference.
    assert paired_t_interval([0.0] * 5) == (0.0, 0.0, 1.0)
    # equal up to rounding is equal: no p = 1e-15 from a t of 4e14
    lo, hi, p = paired_t_interval([3.02, 3.0200000000000005, 3.02])
    assert hi - lo < 1e-12 and p == 0.0
    assert not _lamp_minus_erk([0.0] * 5).significant


def test_report_header_states_the_interval_and_refuses_significance_below_five_seeds(
        tmp_path, monkeypatch):
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])  # figures load models: not needed
    study = load_study(_study(tmp_path, sparsities=(0.9,), seeds=range(5), repairs=("asr",)))
    rows = [dict(r, dense_top1=90.0, run_id=f"{r['allocation']}{r['seed']}", dataset="digits")
            for r in _diff_rows([50.0, 51.0, 49.0, 50.5, 49.5], base=10.0)]
    note = ("Intervals: 95% paired t-interval over calibration seeds of the mean difference "
            "(scipy.stats.t, n-1 degrees of freedom)")
    three = [r for r in rows if r["seed"] < 3]
    report.write_report(study, three, tmp_path / "r3")
    text = (tmp_path / "r3" / "report.md").read_text()
    head = text.split("## Accuracy")[0]
    assert note in head and "only flagged with >= 5 seeds" in head, head
    assert "Significance is not flagged: 3 seeds, fewer than the 5 needed" in head, head
    assert "sign test at p = 0.25" in head, head
    assert " * |" not in text and "nothing flagged: every LAMP - ERK group has 3 seeds" in text
    assert "nan" not in text.lower()
    with open(tmp_path / "r3" / "differences.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert set(row) >= {"ci95_lo", "ci95_hi", "p_value", "significant"}
    assert row["significant"] == "False" and float(row["ci95_lo"]) > 0

    report.write_report(study, rows, tmp_path / "r5")
    text = (tmp_path / "r5" / "report.md").read_text()
    assert note in text and "Significance is not flagged" not in text
    assert " * |" in text and "**lamp** (+50.00 pt" in text, text


def test_paired_difference_flags_significance():
    # 5 seeds (MIN_SEEDS_FOR_SIGNIFICANCE): a clear shift is flagged, noise is not.
    rows = []
    for seed in range(5):
        rows += [{"model": "m", "dataset": "d", "sparsity": 0.9, "repair": "asr", "seed": seed,
                  "allocation": "erk", "top1": 50.0 + seed},
                 {"model": "m", "dataset": "d", "sparsity": 0.9, "repair": "asr", "seed": seed,
                  "allocation": "lamp", "top1": 55.0 + seed + 0.1 * (-1) ** seed}]
    (d,) = paired_diffs(rows, "allocation", "lamp", "erk", ("model", "dataset", "sparsity",
                                                            "repair"))
    assert d.significant and abs(d.mean - 5.0) < 0.2
    rows_noise = [dict(r, top1=r["top1"] + (3 if r["allocation"] == "erk" and r["seed"] % 2
                                            else 0) - (5 if r["allocation"] == "lamp" else 0))
                  for r in rows]
    (d2,) = paired_diffs(rows_noise, "allocation", "lamp", "erk",
                         ("model", "dataset", "sparsity", "repair"))
    assert not d2.significant, f"noise-level difference flagged: CI [{d2.lo}, {d2.hi}]"


def test_transition_detected_on_synthetic_curve():
    curve = {s: {"bn_recal": bn, "asr": asr} for s, bn, asr in [
        (0.80, 70, 72), (0.85, 40, 45), (0.90, 15, 35), (0.93, 12, 25), (0.95, 10, 12)]}
    assert transition_interval(curve, 10) == (0.90, 0.93)
    assert transition_interval({0.9: {"bn_recal": 50, "asr": 52}}, 10) is None



def test_transition_description_names_the_grid_neighbours_of_its_edges():
    grid = [0.9, 0.93, 0.95, 0.97]
    text = describe_interval(grid, [0.97])
    assert "between 0.95 and 0.97" in text and "grid's end 0.97" in text, \
        f"a one-point interval at the grid's end must say where its edges can lie: {text}"
    assert describe_interval(grid, []) == "none found"


def test_transition_description_flags_grid_points_inside_that_do_not_qualify():
    text = describe_interval([0.9, 0.93, 0.95, 0.97], [0.9, 0.95])
    assert "0.9 to 0.95" in text and "do not qualify: 0.93" in text, \
        f"a curve that dips out of the regime inside the interval must be flagged: {text}"
    assert "grid's start 0.9" in text, f"lower edge at the grid's first point not named: {text}"


def _curve_rows(curves: dict, seeds=range(3)) -> list[dict]:
    """Result rows from {allocation: {repair: [top-1 per sparsity of SPARS]}} with a per-seed
    offset, so every paired difference has a spread (no zero-variance intervals)."""
    rows = []
    for alloc, per_repair in curves.items():
        for repair, values in per_repair.items():
            for s, v in zip(SPARS, values):
                for seed in seeds:
                    rows.append({"model": "resnet8", "dataset": "digits", "allocation": alloc,
                                 "sparsity": s, "repair": repair, "seed": seed,
                                 "top1": v + [0.0, 0.1, -0.1][seed], "dense_top1": 90.0,
                                 "run_id": f"{alloc}{s}{seed}"})
    return rows


SPARS = (0.8, 0.9, 0.95, 0.97)


def test_report_reads_the_transition_per_repair_and_where_each_repair_fails(
        tmp_path, monkeypatch):
    """On digits (10 classes) a repair fails below 20%. ERK: bn_recal fails from 0.95; asr
    recovers only at 0.95 (22 >= 20 and >= 15 + 5), reconstruct at 0.95 and 0.97."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    study = load_study(_study(tmp_path, sparsities=SPARS, seeds=range(3),
                              repairs=("none", "bn_recal", "asr", "reconstruct")))
    erk = {"none": [30, 10, 10, 10], "bn_recal": [60, 30, 15, 12],
           "asr": [62, 33, 22, 14], "reconstruct": [80, 70, 50, 30]}
    lamp = {r: [v + d for v, d in zip(vals, (2.0, -2.0, 0.0, 2.0))] for r, vals in erk.items()}
    out = report.write_report(study, _curve_rows({"erk": erk, "lamp": lamp}), tmp_path / "r")
    assert out["transition_by_repair"]["resnet8/digits/erk"] == \
        {"asr": [0.95], "reconstruct": [0.95, 0.97]}
    assert out["transition"]["resnet8/digits/erk"] == (0.95, 0.97)
    assert out["fails_from"]["resnet8/digits/erk"] == \
        {"none": "0.9", "bn_recal": "0.95", "asr": "0.97", "reconstruct": "> 0.97"}
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| resnet8/digits/erk | 0.95 | 0.95-0.97 | 0.95-0.97 |" in text, text
    assert "| resnet8/digits/erk | 0.9 | 0.95 | 0.97 | > 0.97 |" in text, text
    # LAMP ahead at 0.8, ERK at 0.9, neither at 0.95 (a 0.0 shift), LAMP at 0.97: two flips,
    # read the same way after every repair.
    assert "| lamp 0.8, erk 0.9, lamp 0.97 | 2 |" in text, text
    # reconstruct's comparisons are tabulated and written to the CSV as well
    assert "### reconstruct - bn_recal per allocation (pt)" in text
    with open(tmp_path / "r" / "differences.csv") as f:
        labels = {row["difference"] for row in csv.DictReader(f)}
    assert labels == {"lamp - erk", "asr - bn_recal", "reconstruct - bn_recal"}, labels


def test_report_judges_selection_only_on_seeds_with_every_planned_candidate(
        tmp_path, monkeypatch):
    """The study plans ERK and LAMP; seed 2 has only ERK done. Its selection is a choice
    among fewer candidates and is counted apart, by the study file's plan, not the rows'."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    study = load_study(_study(tmp_path, sparsities=SPARS, seeds=range(3),
                              repairs=("none", "bn_recal")))
    curves = {"none": [30, 10, 10, 10], "bn_recal": [60, 30, 15, 12]}
    ids = {(cfg.allocation, cfg.sparsity, cfg.seed): rid for rid, cfg in study.runs}
    rows = [dict(r, agreement=r["top1"], kl=1.0 / r["top1"],
                 run_id=ids[(r["allocation"], r["sparsity"], r["seed"])])
            for r in _curve_rows({"erk": curves, "lamp": curves})
            if not (r["allocation"] == "lamp" and r["seed"] == 2)]
    out = report.write_report(study, rows, tmp_path / "r")
    sel = out["selection"]["agreement"]
    assert (sel["n_selections"], sel["n_incomplete"]) == (2 * len(SPARS), len(SPARS))
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"{len(SPARS)} selections still missing candidates left out" in text, text
    # the allocation choice with the repair fixed follows the same plan: seed 2 lacks lamp
    assert out["allocation_choice"]["bn_recal"]["n_selections"] == 2 * len(SPARS)
    # without lamp in any row, only the study's plan can tell that every seed is short
    erk_only = [r for r in rows if r["allocation"] == "erk"]
    out = report.write_report(study, erk_only, tmp_path / "e")
    assert out["selection"]["kl"]["n_selections"] == 0
    assert out["selection"]["kl"]["n_incomplete"] == 3 * len(SPARS)
    assert out["allocation_choice"] == {}


def test_best_allocation_names_the_leader_its_lead_and_whether_the_lead_is_resolved(
        tmp_path, monkeypatch):
    """Three allocations, three seeds. At 0.8 uniform leads lamp by 2 pt in every seed
    (resolved: *); at 0.9 erk leads lamp by 0.1 on average with seed noise of +-1 (not
    resolved); at 0.95 only erk ran. The flagged best never changes: one flagged cell."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    top1 = {("erk", 0.8): 50.0, ("lamp", 0.8): 58.0, ("uniform", 0.8): 60.0,
            ("erk", 0.9): 40.1, ("lamp", 0.9): 40.0, ("uniform", 0.9): 30.0, ("erk", 0.95): 20.0}
    noise = {("erk", 0.9): [1.0, -1.0, 0.0]}
    rows = [{"model": "resnet8", "dataset": "digits", "allocation": a, "sparsity": sp,
             "repair": "bn_recal", "seed": k, "top1": v + noise.get((a, sp), [0.0] * 3)[k],
             "dense_top1": 90.0, "run_id": f"{a}{sp}{k}"}
            for (a, sp), v in top1.items() for k in range(3)]
    best = report.best_allocations(rows)[("resnet8", "digits", "bn_recal")]
    assert best[0.8] == {"best": "uniform", "runner_up": "lamp", "margin": pytest.approx(2.0),
                         "lo": pytest.approx(2.0), "hi": pytest.approx(2.0), "n": 3,
                         "ahead": True, "allocations": 3}
    assert (best[0.9]["best"], best[0.9]["runner_up"], best[0.9]["ahead"]) == \
        ("erk", "lamp", False)
    assert best[0.9]["lo"] < 0 < best[0.9]["hi"]
    assert best[0.95]["runner_up"] is None and best[0.95]["allocations"] == 1
    study = load_study(_study(tmp_path, sparsities=(0.8, 0.9, 0.95), seeds=range(3),
                              repairs=("none", "bn_recal")))
    out = report.write_report(study, rows, tmp_path / "r")
    assert out["best_allocation"]["resnet8/digits/bn_recal"][0.8]["best"] == "uniform"
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| resnet8/digits/bn_recal | **uniform +2.00** | erk +0.10 | erk (1 alloc) | 0 |" \
        in text, text


def test_report_plans_selection_candidates_only_from_runs_that_record_label_free_scores(
        tmp_path, monkeypatch):
    """A [[models]] table may sweep more allocations of the same model without scoring: its
    uniform runs record no agreement or KL, so they are never candidates of a selection, and
    planning them would leave every seed of the scored ERK and LAMP runs incomplete."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    f = _study(tmp_path, sparsities=SPARS, seeds=range(3), repairs=("none", "bn_recal"))
    text = f.read_text().replace('allocations = ["erk", "lamp"]',
                                 'allocations = ["erk", "lamp"]\nscoring = 64')
    f.write_text(text + text[text.index("[[models]]"):].replace(
        "[[models]]", '[[models]]\nallocations = ["uniform"]\nscoring = 0'))
    study = load_study(f)
    curves = {"none": [30, 10, 10, 10], "bn_recal": [60, 30, 15, 12]}
    ids = {(cfg.allocation, cfg.sparsity, cfg.seed): rid for rid, cfg in study.runs}
    rows = [dict(r, run_id=ids[(r["allocation"], r["sparsity"], r["seed"])],
                 **({"agreement": None, "kl": None} if r["allocation"] == "uniform" else
                    {"agreement": r["top1"], "kl": 1.0 / r["top1"]}))
            for r in _curve_rows({"erk": curves, "lamp": curves, "uniform": curves})]
    sel = report.write_report(study, rows, tmp_path / "r")["selection"]["kl"]
    assert (sel["n_selections"], sel["n_incomplete"]) == (3 * len(SPARS), 0), sel

def test_fails_from_names_the_grid_start_and_a_curve_that_comes_back():
    from sparse_repair.study.report_writer import _fails_from

    curve = {0.8: {"a": 15.0}, 0.9: {"a": 25.0}, 0.95: {"a": 10.0}}
    assert _fails_from(curve, "a", 20.0) == "<= 0.8 (above again at 0.9)"
    assert _fails_from({0.8: {"a": 50.0}, 0.9: {"a": 19.9}}, "a", 20.0) == "0.9"
    assert _fails_from({0.8: {"a": 50.0}}, "b", 20.0) == "-"


def test_report_transition_tables_tell_not_run_from_not_found(tmp_path, monkeypatch):
    """A repair absent from a curve, or a curve without bn_recal, cannot show a transition:
    the tables say so instead of "-" (which reads "nowhere on the grid"); a report with no
    rows or no pairs has no empty table or heading over nothing."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    study = load_study(_study(tmp_path, sparsities=SPARS, seeds=range(3),
                              repairs=("none", "bn_recal", "asr", "reconstruct")))
    erk = {"none": [30, 10, 10, 10], "bn_recal": [60, 30, 15, 12],
           "asr": [62, 33, 22, 14], "reconstruct": [80, 70, 50, 30]}
    lamp = {r: v for r, v in erk.items() if r != "reconstruct"}  # reconstruct never ran
    out = report.write_report(study, _curve_rows({"erk": erk, "lamp": lamp}), tmp_path / "a")
    assert "reconstruct" not in out["transition_by_repair"]["resnet8/digits/lamp"], "not run"
    text = (tmp_path / "a" / "report.md").read_text()
    assert "| resnet8/digits/lamp | 0.95 | not run | 0.95 |" in text, text
    assert "| resnet8/digits/lamp | 0.9 | 0.95 | 0.97 | - |" in text, "fails: - is not run"

    no_bn = {"erk": {r: v for r, v in erk.items() if r != "bn_recal"}}
    out = report.write_report(study, _curve_rows(no_bn), tmp_path / "b")
    assert out["transition_by_repair"]["resnet8/digits/erk"] is None, "not read, not nowhere"
    text = (tmp_path / "b" / "report.md").read_text()
    assert "- resnet8/digits/erk: not read: no bn_recal in these rows" in text, text
    assert "| resnet8/digits/erk | no bn_recal | no bn_recal | no bn_recal |" in text, text
    # "none" is a repair's name too: the heading must not list it as the recovering repair
    report.write_report(study, _curve_rows({"erk": {"none": erk["none"]}}), tmp_path / "c")
    text = (tmp_path / "c" / "report.md").read_text()
    assert "a recovering repair (none in these rows)" not in text
    assert "- no pairs in these rows for any of lamp - erk" in text, text

    report.write_report(study, [], tmp_path / "d")
    text = (tmp_path / "d" / "report.md").read_text()
    assert "- no finished cells in these rows" in text and "|  |" not in text, text
    assert "nan" not in text.lower()


def test_report_counts_the_seeds_each_models_table_plans(tmp_path, monkeypatch):
    """A [[models]] table may set its own seeds: a finished model with 3 of a study's 5
    seeds has all its seeds, and "(n=k)" marks only cells short of their model's own."""
    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    f = _study(tmp_path, seeds=range(5), repairs=("none", "bn_recal", "asr"))
    f.write_text(f.read_text() + f'[[models]]\nmodel = "resnet8"\ndataset = "cifar10"\n'
                 f'weights = "{CKPT.as_posix()}"\nseeds = [0, 1, 2]\n')
    study = load_study(f)
    rows = [{"model": cfg.model, "dataset": cfg.dataset, "allocation": cfg.allocation,
             "sparsity": cfg.sparsity, "repair": r, "seed": cfg.seed,
             "top1": v + 0.1 * cfg.seed + (cfg.allocation == "lamp"), "dense_top1": 90.0,
             "run_id": rid}
            for rid, cfg in study.runs for r, v in (("none", 30.0), ("bn_recal", 40.0),
                                                    ("asr", 45.0))
            if not (cfg.dataset == "digits" and cfg.seed == 4 and cfg.sparsity == 0.9)]
    report.write_report(study, rows, tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "the seeds the study plans for that model and data set (3/5)" in text, text
    cifar = [ln for ln in text.splitlines() if ln.startswith("| resnet8/cifar10/")]
    assert cifar and not any("(n=" in ln for ln in cifar), \
        "cifar10 has all 3 of its seeds: no cell may be marked short"
    assert "| resnet8/digits/asr | +1.00 [+1.00, +1.00] * | +1.00 [+1.00, +1.00] (n=4) |" \
        in text, "digits at 0.9 lacks one of its 5 seeds"


needs_assets = pytest.mark.skipif(
    not (os.environ.get("SPARSE_REPAIR_ASSETS") and
         (Path(os.environ["SPARSE_REPAIR_ASSETS"]) / "cifar10-jpeg").exists()),
    reason="set SPARSE_REPAIR_ASSETS to an asset root with cifar10-jpeg and weights")


def test_report_end_to_end_on_digits(tmp_path):
    study, db = _study(tmp_path, repairs=("bn_recal", "asr")), tmp_path / "e.sqlite"
    assert _cli("run", str(study), "--db", str(db)).returncode == 0
    r = _cli("report", str(study), "--db", str(db), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Transition regime" in text and "lamp - erk" in text
    assert "Significance is not flagged: 1 seed, fewer than the 5 needed" in text \
        and " [n/a] |" in text and "nan" not in text.lower(), \
        "one seed: no interval and no test, printed as n/a"
    assert "| allocation | sparsity | bn_recal | asr | n |" in text, \
        "the accuracy table needs one column per repair, in the study file's order"
    assert (tmp_path / "rep" / "cells.csv").exists()


def test_report_and_status_cover_only_the_study_files_runs(tmp_path):
    db = tmp_path / "shared.sqlite"
    wide = _study(tmp_path, sparsities=(0.8, 0.9), name="wide")
    assert _cli("run", str(wide), "--db", str(db)).returncode == 0
    narrow = _study(tmp_path, sparsities=(0.8,), name="narrow")
    status = _cli("status", str(narrow), "--db", str(db))
    assert "2/2 runs done" in status.stdout and "2 runs;" in status.stdout, \
        f"runs of another study in the same store must not count: {status.stdout}"
    r = _cli("report", str(narrow), "--db", str(db), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "rep" / "cells.csv") as f:
        sparsities = {row["sparsity"] for row in csv.DictReader(f)}
    assert sparsities == {"0.8"}, \
        f"the report must hold only the study file's runs, got sparsities {sparsities}"


def test_status_wall_times_are_per_model_and_data_set(tmp_path):
    store = Store(tmp_path / "w.sqlite")
    for rid, dataset, wall in (("a", "cifar10-jpeg", 50.0), ("b", "cifar10-jpeg", 60.0),
                               ("c", "imagenette", 200.0)):
        config = {"model": "resnet20", "dataset": dataset, "allocation": "erk",
                  "sparsity": 0.9, "seed": 0}
        row = {"config": config, "repair": "none", "top1": 10.0, "n_eval": 10, "seconds": 0.0,
               "passes_dense": 0, "passes_pruned": 0, "path": "none",
               "sparsity_achieved": 0.9}
        store.write_run(rid, [row], dense_top1=90.0, wall_s=wall)
    walls = store.wall_times()
    assert walls == {"resnet20/cifar10-jpeg": [50.0, 60.0], "resnet20/imagenette": [200.0]}, (
        f"one model on two data sets must give two wall-time groups, got {walls}")
    assert store.wall_times({"c"}) == {"resnet20/imagenette": [200.0]}, \
        "only the asked runs may count"


def test_report_of_an_unfinished_study_says_it_is_incomplete(tmp_path):
    db = tmp_path / "partial.sqlite"
    narrow = _study(tmp_path, sparsities=(0.8,), name="narrow")
    assert _cli("run", str(narrow), "--db", str(db)).returncode == 0
    wide = _study(tmp_path, sparsities=(0.8, 0.9), name="wide")
    r = _cli("report", str(wide), "--db", str(db), "--out", str(tmp_path / "wide"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "wide" / "report.md").read_text()
    assert "Incomplete: 2 of 4 runs done" in text, \
        f"a report over half the runs must say so in its header:\n{text[:400]}"
    r = _cli("report", str(narrow), "--db", str(db), "--out", str(tmp_path / "narrow"))
    assert "Incomplete" not in (tmp_path / "narrow" / "report.md").read_text(), \
        "a finished study's report must not be flagged incomplete"


@needs_assets
def test_report_end_to_end_on_resnet20(tmp_path):
    f = tmp_path / "r20.toml"
    f.write_text('name = "r20"\ncalib = 256\nn_eval = 500\nseeds = [0]\n'
                 'allocations = ["erk"]\nsparsities = [0.8, 0.9]\n'
                 'repairs = ["bn_recal", "asr"]\n[[models]]\nmodel = "resnet20"\n'
                 'dataset = "cifar10-jpeg"\npretrained = true\n')
    db = tmp_path / "r20.sqlite"
    assert _cli("run", str(f), "--db", str(db)).returncode == 0
    r = _cli("report", str(f), "--db", str(db), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert "resnet20" in (tmp_path / "rep" / "report.md").read_text()


# ----------------------------------------------------------------------------- store, API, report

def test_study_files_load_without_tomllib(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib; spec.py then uses tomli (a dependency below 3.11)."""
    pytest.importorskip("tomli", reason="tomli is not installed (a dependency on Python < 3.11 "
                                        "only); pip install tomli to run this check")
    import importlib.util

    import sparse_repair.study.spec as spec

    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails, as on 3.10
    # A fresh copy of spec.py rather than importlib.reload: a reload would swap Study and
    # load_study under every module that imported them, for the rest of the session.
    found = importlib.util.spec_from_file_location("sparse_repair.study._spec_no_tomllib",
                                                   spec.__file__)
    fresh = importlib.util.module_from_spec(found)
    monkeypatch.setitem(sys.modules, found.name, fresh)  # dataclasses look their module up
    found.loader.exec_module(fresh)
    assert fresh.tomllib.__name__ == "tomli", "the fallback parser was not used"
    assert [r for r, _ in fresh.load_study(_study(tmp_path)).runs] == \
        [r for r, _ in load_study(_study(tmp_path)).runs], "tomli must expand the same grid"


def test_report_cells_equal_stats_cells():
    from sparse_repair.study.report_writer import cell_table
    from sparse_repair.study.stats import cells

    rng = np.random.default_rng(0)
    rows = [{"model": "m", "dataset": "d", "allocation": a, "sparsity": s, "repair": r,
             "seed": seed, "top1": float(rng.uniform(0, 100))}
            for a in ("erk", "lamp") for s in (0.8, 0.9) for r in ("asr", "bn_recal")
            for seed in range(1 if s == 0.8 else 3)]
    import pandas as pd

    got = cell_table(pd.DataFrame(rows)).to_dict("records")
    want = cells(rows)
    assert [{k: g[k] for k in ("model", "dataset", "allocation", "sparsity", "repair", "n")}
            for g in got] == [{k: w[k] for k in ("model", "dataset", "allocation", "sparsity",
                                                  "repair", "n")} for w in want]
    assert np.allclose([g["mean"] for g in got], [w["mean"] for w in want])
    assert np.allclose([g["std"] for g in got], [w["std"] for w in want]), \
        "std must be ddof=1 over seeds and 0 for one seed, as stats.cells"


def test_set_asset_root_is_absolute_and_refuses_empty(tmp_path, monkeypatch):
    from sparse_repair.assets import ENV_VAR, asset_root, set_asset_root

    monkeypatch.setenv(ENV_VAR, "unchanged")  # restored after the test
    monkeypatch.chdir(tmp_path)
    assert set_asset_root("rel") == tmp_path / "rel" == asset_root(), \
        "a relative root must reach workers in other directories as an absolute path"
    with pytest.raises(ValueError, match="empty asset root"):
        set_asset_root("")


def test_new_store_appears_with_its_tables(tmp_path):
    db = tmp_path / "new.sqlite"
    Store(db).close()
    with sqlite3.connect(db) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"results", "runs", "allocation_layers", "repair_layers"}, tables
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("new.sqlite")]
    assert left == [], f"the temporary file the store is built in was left behind: {left}"
    Store(db).close()  # opening an existing store keeps it


def _run_single_with_layers(real):
    """run_single as it behaves once its rows carry each repair's per-BN statistics (key
    "layers": RepairReport.to_dict(with_layers=True)["layers"]), the one-line change to
    sparse_repair/run.py that issue #16 asks for; here the reports are caught by wrapping the
    repair call that run_single makes."""
    import sparse_repair.run as run_mod

    def wrapped(cfg, dense=None, progress=False):
        reports, real_repair = [], run_mod.repair

        def recording(*a, **k):
            reports.append(real_repair(*a, **k))
            return reports[-1]

        run_mod.repair = recording
        try:
            rows = real(cfg, dense=dense, progress=progress)
        finally:
            run_mod.repair = real_repair
        for row, rep in zip(rows, reports):
            row.setdefault("layers", rep.to_dict(with_layers=True)["layers"])
        return rows

    return wrapped


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-run digits study (ERK and LAMP at 0.9) run through the Python API, its
    store holding per-layer allocations and repair statistics."""
    import sparse_repair.run as run_mod
    from sparse_repair import study as study_api

    tmp = tmp_path_factory.mktemp("finished")
    path, db = _study(tmp, sparsities=(0.9,), repairs=("bn_recal", "asr")), tmp / "f.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "run_single", _run_single_with_layers(run_mod.run_single))
        assert study_api.run(path, db=db).exit_code == 0
    return path, db


@pytest.fixture
def no_pipeline(monkeypatch):
    """Loading, allocating, pruning, calibrating or repairing raises: a report must not."""
    import sparse_repair.allocation
    import sparse_repair.data
    import sparse_repair.pruning
    import sparse_repair.repair
    import sparse_repair.run

    def forbidden(*a, **k):
        raise AssertionError("the report re-ran the pipeline")

    for module, name in ((sparse_repair.allocation, "allocate"), (sparse_repair.pruning, "prune_"),
                         (sparse_repair.repair, "repair"), (sparse_repair.run, "repair"),
                         (sparse_repair.run, "run_single"), (sparse_repair.run, "load_dense"),
                         (sparse_repair.data, "calibration_set")):
        monkeypatch.setattr(module, name, forbidden)


def test_store_holds_the_allocation_that_was_pruned(finished):
    from sparse_repair.allocation import allocate
    from sparse_repair.run import load_dense

    path, db = finished
    study = load_study(path)
    store = Store(db)
    layers = store.allocation_layers({rid for rid, _ in study.runs})
    stats = store.repair_layers({rid for rid, _ in study.runs}, repair="asr")
    for rid, cfg in study.runs:
        want = allocate(load_dense(cfg), cfg.allocation, cfg.sparsity).to_dict()["layers"]
        got = layers[rid]
        assert [(g["name"], g["shape"], g["numel"], g["keep_count"]) for g in got] == \
            [(w["name"], w["shape"], w["weights"], w["keep"]) for w in want], cfg.allocation
        assert all(abs(g["density"] - g["keep_count"] / g["numel"]) < 1e-12 for g in got)
        bns = stats[(rid, "asr")]
        assert bns and all(len(b["gain"]) == len(b["sd_d"]) == len(b["sd_s"]) for b in bns), \
            "per-BN statistics of asr must be stored per channel"
    store.close()


def test_report_draws_per_layer_plots_from_the_store_alone(finished, no_pipeline, tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    out = study_api.report(path, tmp_path / "rep", db=db)
    assert set(out["plots"]) == {"accuracy_resnet8_digits.png", "density_resnet8_0.9.png",
                                 "damage_resnet8_0.9.png"}, out
    assert out["skipped"] == [] and out["runs_done"] == out["runs_total"] == 2, out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "![damage_resnet8_0.9.png](damage_resnet8_0.9.png)" in text
    assert all((tmp_path / "rep" / p).stat().st_size > 0 for p in out["plots"])


# The schema before per-layer data was stored (results and runs only).
OLD_SCHEMA = """
CREATE TABLE results (
    run_id TEXT NOT NULL, repair TEXT NOT NULL,
    model TEXT, dataset TEXT, allocation TEXT, sparsity REAL, seed INTEGER,
    top1 REAL, n_eval INTEGER, seconds REAL, passes_dense INTEGER, passes_pruned INTEGER,
    path TEXT, sparsity_achieved REAL, dense_top1 REAL,
    config TEXT, env TEXT, created REAL,
    PRIMARY KEY (run_id, repair));
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, attempts INTEGER DEFAULT 0,
    error TEXT, config TEXT, updated REAL, wall_s REAL);
"""


def test_old_store_without_per_layer_tables_still_reports(finished, no_pipeline, tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as c:
        c.executescript(OLD_SCHEMA)
        c.execute("ATTACH DATABASE ? AS new", (str(db),))
        # The old table has the columns of its day: copy those (the new store has more).
        old_cols = [r[1] for r in c.execute("PRAGMA table_info(results)")]
        c.execute(f"INSERT INTO results SELECT {', '.join(old_cols)} FROM new.results")
        c.execute("INSERT INTO runs SELECT * FROM new.runs")
    c.close()
    out = study_api.report(path, tmp_path / "rep", db=old)
    assert out["plots"] == ["accuracy_resnet8_digits.png"], out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "- not drawn: per-layer density plot" in text and \
        "- not drawn: per-channel damage plot" in text, text
    assert text.count("never re-runs the pipeline") == 2, "each skipped plot must say why"
    assert "| erk | 0.9 |" in text, "the tables must not depend on per-layer data"


def test_python_api_runs_a_study_and_reports_status_without_the_cli(tmp_path):
    path, db = _study(tmp_path, sparsities=(0.9,)), tmp_path / "api.sqlite"
    code = f"""
import json, sys
from sparse_repair import study
first = study.run({str(path)!r}, db={str(db)!r})
again = study.run({str(path)!r}, db={str(db)!r})
st = study.status({str(path)!r}, db={str(db)!r})
print(json.dumps({{"first": [first.exit_code, first.ran, first.done_before],
                  "again": [again.exit_code, again.ran, again.done_before],
                  "status": [st[k] for k in ("runs_total", "done", "failed", "pending")],
                  "walls": list(st["wall_s"]),
                  "cli": [m for m in ("sparse_repair.cli", "sparse_repair.study.cli")
                          if m in sys.modules]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["first"] == [0, 2, 0] and got["again"] == [0, 0, 2], got
    assert got["status"] == [2, 2, 0, 0] and got["walls"] == ["resnet8/digits"], got
    assert got["cli"] == [], f"the API must not go through the command line: {got['cli']}"


def test_study_file_with_an_unknown_key_is_refused_naming_the_valid_ones(tmp_path):
    """Study files are built through RunConfig.from_dict: a typo is an error, not a default."""
    study = tmp_path / "typo.toml"
    study.write_text('seeds = [0]\nallocations = ["erk"]\nsparsities = [0.9]\n'
                     'repairs = ["none"]\ncalibration = 512\n\n[[models]]\nmodel = "resnet8"\n'
                     'dataset = "digits"\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'calibration' at top level; "
                                         r"valid keys: name, models, seeds"):
        load_study(study)
    study.write_text(study.read_text().replace("calibration = 512\n", "") +
                     'repair_option = {}\n')
    with pytest.raises(ValueError, match=r"'repair_option' at \[\[models\]\] resnet8"):
        load_study(study)
    # a study-level key inside a model table was accepted and dropped
    study.write_text(study.read_text().replace("repair_option = {}\n", 'name = "mine"\n'))
    with pytest.raises(ValueError, match=r"'name' at \[\[models\]\] resnet8 is a study-level "
                                         r"key; put it at the top"):
        load_study(study)
    # an empty weights path meant the published weights, silently
    study.write_text(study.read_text().replace('name = "mine"\n', 'weights = ""\n'))
    with pytest.raises(ValueError, match=r"weights is an empty path"):
        load_study(study)


def test_a_bad_checkpoint_stops_the_study_before_any_run(tmp_path):
    """A truncated checkpoint is one clear error naming the study, before the store exists,
    not a failure recorded for every run after every retry."""
    from sparse_repair import study as study_api

    bad = tmp_path / "resnet8-digits.pt"
    bad.write_bytes(CKPT.read_bytes()[:2000])
    (tmp_path / "resnet8-digits.pt.json").write_bytes(Path(str(CKPT) + ".json").read_bytes())
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "s"\ncalib = 64\nn_eval = 100\nseeds = [0]\n'
                    f'allocations = ["erk"]\nsparsities = [0.5]\nrepairs = ["none"]\n'
                    f'[[models]]\nmodel = "resnet8"\ndataset = "digits"\n'
                    f'weights = "{bad.as_posix()}"\n')
    db = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match=r"s\.toml: model resnet8 with weights .*truncated"):
        study_api.run(spec, db=db)
    assert not db.exists(), "the store was opened before the weights were checked"


def test_a_checkpoint_of_another_architecture_is_refused_by_name():
    from sparse_repair.run import RunConfig, load_dense

    with pytest.raises(ValueError, match="holds a resnet8 .* pass --model resnet8"):
        load_dense(RunConfig(model="resnet20", dataset="digits", weights=str(CKPT)))


def test_report_keeps_runs_of_different_calibration_sizes_apart(tmp_path, monkeypatch):
    """A [[models]] entry may override calib (or n_eval, resolution): those runs are another
    setting, so the report labels their model with it instead of pooling them into one cell."""
    import json as _json

    from sparse_repair.study import report_writer as report

    monkeypatch.setattr(report, "_plots", lambda *a, **k: [])
    study = load_study(_study(tmp_path, sparsities=(0.9,), seeds=range(2), repairs=("asr",)))
    rows = []
    for calib, top1 in ((256, 40.0), (1024, 60.0)):
        for seed in range(2):
            rows.append({"model": "resnet8", "dataset": "digits", "allocation": "erk",
                         "sparsity": 0.9, "repair": "asr", "seed": seed, "top1": top1 + seed,
                         "dense_top1": 90.0, "run_id": f"c{calib}s{seed}",
                         "config": _json.dumps({"calib": calib, "n_eval": None})})
    report.write_report(study, rows, tmp_path / "r")
    with open(tmp_path / "r" / "cells.csv") as f:
        cells = {r["model"]: float(r["mean"]) for r in csv.DictReader(f)}
    assert cells == {"resnet8-calib256": 40.5, "resnet8-calib1024": 60.5}, cells
    same = [dict(r, config=_json.dumps({"calib": 1024})) for r in rows]
    assert {r["model"] for r in report.split_settings(same)} == {"resnet8"}


# ----------------------------------------------------------------------------- snapshots
# A store lives under the ignored results/; a snapshot file carries its finished runs across
# machines and sessions (the fifth session's 209-run evidence store was lost with its checkout).

def _table(db: Path, name: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return sorted(c.execute(f"SELECT * FROM {name}").fetchall(), key=repr)


def test_snapshot_round_trip_restores_every_table_bit_for_bit(finished, no_pipeline, tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    snap = tmp_path / "s.runs.jsonl.gz"
    assert study_api.export(path, snap, db=db, layer_stats="all")["runs"] == 2
    copy = tmp_path / "copy.sqlite"
    got = study_api.import_(path, snap, db=copy)
    assert (got["imported"], got["already_done"], got["done"]) == (2, 0, 2), got
    for name in ("results", "runs", "allocation_layers", "repair_layers"):
        assert _table(copy, name) == _table(db, name), f"{name} changed in the round trip"
    a = study_api.report(path, tmp_path / "a", db=db)
    b = study_api.report(path, tmp_path / "b", db=copy)
    assert a["plots"] == b["plots"] and a["skipped"] == b["skipped"] == []
    svgs = [p.replace(".png", ".svg") for p in a["plots"]]  # no random ids or dates in them
    for f in ("report.md", "cells.csv", "differences.csv", *svgs):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text(), f


def test_snapshot_bytes_depend_only_on_the_store(finished, tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    study_api.export(path, tmp_path / "1.gz", db=db)
    time.sleep(1.1)  # gzip would stamp the second file with another mtime
    study_api.export(path, tmp_path / "2.gz", db=db)
    assert (tmp_path / "1.gz").read_bytes() == (tmp_path / "2.gz").read_bytes()


def test_snapshot_keeps_per_channel_statistics_only_of_the_runs_given(finished, tmp_path):
    from sparse_repair.study.store import read_snapshot

    path, db = finished
    ids = [rid for rid, _ in load_study(path).runs]
    store = Store(db)
    store.export(tmp_path / "s.gz", ids, layer_stats=ids[:1])
    store.close()
    _, records = read_snapshot(tmp_path / "s.gz")
    assert records[ids[0]]["repair_layers"] and not records[ids[1]]["repair_layers"]
    assert all(records[r]["allocation_layers"] and records[r]["results"] for r in ids), \
        "results and allocations are always written whole"


def test_layer_plot_runs_are_the_first_models_lowest_seed_nearest_0_9(tmp_path):
    from sparse_repair.study.spec import layer_plot_runs

    study = load_study(_study(tmp_path, sparsities=(0.8, 0.85, 0.95), seeds=(0, 1)))
    by = {(c.allocation, c.sparsity, c.seed): rid for rid, c in study.runs}
    assert layer_plot_runs(study, set()) == (None, {})
    # 0.85 and 0.95 are equally near 0.9: the lower one; seed 0 missing for LAMP: seed 1
    done = {by["erk", 0.85, 0], by["erk", 0.85, 1], by["lamp", 0.85, 1], by["erk", 0.95, 0]}
    assert layer_plot_runs(study, done) == (0.85, {"erk": (by["erk", 0.85, 0], 0),
                                                   "lamp": (by["lamp", 0.85, 1], 1)})
    assert layer_plot_runs(study, {by["lamp", 0.8, 1]}) == (0.8, {"lamp": (by["lamp", 0.8, 1], 1)})


def test_a_relative_weights_path_leaves_no_machine_path_in_the_store_or_snapshot(tmp_path):
    """A study file may name its checkpoint relative to itself; workers get the resolved path,
    but the store (and so a committed snapshot) names the checkpoint by file name and content
    hash, as the run id does: a snapshot holds no absolute machine path."""
    import gzip
    import shutil

    from sparse_repair import study as study_api

    for suffix in ("", ".json"):
        shutil.copy(str(CKPT) + suffix, tmp_path / (CKPT.name + suffix))
    path = _study(tmp_path, sparsities=(0.9,), repairs=("bn_recal",))
    path.write_text(path.read_text().replace(CKPT.as_posix(), CKPT.name)
                    .replace('allocations = ["erk", "lamp"]', 'allocations = ["erk"]'))
    db = tmp_path / "r.sqlite"

    def fail(cfg, assets):
        raise RuntimeError("injected")

    def configs() -> list[str]:
        with sqlite3.connect(db) as c:
            return [r[0] for r in c.execute("SELECT config FROM results UNION ALL "
                                            "SELECT config FROM runs")]

    here = str(tmp_path)
    assert study_api.run(path, db=db, fn=fail, retries=0).exit_code != 0
    failed = configs()
    assert failed and not [t for t in failed if here in t], "a failed run's config too"
    assert study_api.run(path, db=db).exit_code == 0, "the failed run is retried and done"
    study_api.export(path, tmp_path / "s.gz", db=db)
    stored = configs()
    assert len(stored) == 2 and not [t for t in stored if here in t], stored
    assert all(f'"{CKPT.name}:' in t for t in stored), "the checkpoint is named by identity"
    assert here not in gzip.decompress((tmp_path / "s.gz").read_bytes()).decode()


def test_export_refuses_to_drop_runs_a_snapshot_already_holds(finished, tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    snap = tmp_path / "s.gz"
    study_api.export(path, snap, db=db)
    before = snap.read_bytes()
    emptier = tmp_path / "emptier.sqlite"  # a fresh checkout's store, before importing
    Store(emptier).close()
    with pytest.raises(ValueError, match="holds 2 done run.*Import it first"):
        study_api.export(path, snap, db=emptier)
    assert snap.read_bytes() == before, "a refused export must leave the snapshot as it was"
    assert study_api.export(path, snap, db=emptier, overwrite=True)["runs"] == 0
    with pytest.raises(FileNotFoundError, match="no result store"):
        study_api.export(path, snap, db=tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()


def test_import_keeps_done_runs_replaces_failed_ones_and_skips_other_studies(finished,
                                                                             tmp_path):
    from sparse_repair import study as study_api

    path, db = finished
    snap = tmp_path / "s.gz"
    study_api.export(path, snap, db=db)
    ids = [rid for rid, _ in load_study(path).runs]
    target = tmp_path / "t.sqlite"
    store = Store(target)
    store.write_failure(ids[1], {}, "Traceback: boom")
    store.close()
    study_api.import_(path, snap, db=target)
    again = study_api.import_(path, snap, db=target)
    assert (again["imported"], again["already_done"]) == (0, 2), again
    assert _table(target, "results") == _table(db, "results")
    with sqlite3.connect(target) as c:  # the failed attempt is kept in the count
        assert c.execute("SELECT attempts FROM runs WHERE run_id=?", (ids[1],)).fetchone()[0] \
            == 2
    c.close()
    wider = _study(tmp_path, sparsities=(0.5, 0.9), name="wider")  # holds the snapshot's runs
    got = study_api.import_(wider, snap, db=tmp_path / "w.sqlite")
    assert (got["imported"], got["not_in_study"], got["done"], got["runs_total"]) == \
        (2, 0, 2, 4), got
    # A study sharing no run (another file, or a checkpoint moved or changed: run ids hash
    # it) is refused, not answered with "imported 0" and an empty store to recompute into.
    other = _study(tmp_path, sparsities=(0.5,), name="other")
    with pytest.raises(ValueError, match="none of the 2 runs .* belongs to .*weights paths"):
        study_api.import_(other, snap, db=tmp_path / "o.sqlite")
    assert not (tmp_path / "o.sqlite").exists()


DAMAGES = {  # record edits a snapshot must be refused for, each found by a hostile-input pass
    "unknown column": lambda r: r["results"][0].update({"top1; DROP TABLE runs": 1}),
    "failed run": lambda r: r["runs"].update(status="failed"),
    "nested value": lambda r: r["results"][0].update(top1=[91.7]),
    "text top-1": lambda r: r["results"][0].update(top1="abc"),
    "no repair": lambda r: r["results"][0].pop("repair"),              # NOT NULL
    "repair twice": lambda r: r["results"].append(dict(r["results"][0])),  # primary key
    "no layer name": lambda r: r["allocation_layers"][0].pop("name"),
    "huge int": lambda r: r["results"][0].update(n_eval=10 ** 30),     # SQLite INTEGER range
    "lone surrogate": lambda r: r["allocation_layers"][0].update(name="\ud800"),
}


@pytest.mark.parametrize("damage", ["not gzip", "truncated", "bad json", "no header",
                                    "wrong count", "NaN", "run twice", *DAMAGES])
def test_a_damaged_snapshot_is_refused_before_anything_is_written(finished, tmp_path, damage):
    import gzip
    import json

    from sparse_repair import study as study_api

    path, db = finished
    snap = tmp_path / "s.gz"
    study_api.export(path, snap, db=db)
    lines = gzip.open(snap, "rt").read().splitlines()
    if damage == "not gzip":
        snap.write_text("\n".join(lines))
    elif damage == "truncated":
        snap.write_bytes(snap.read_bytes()[:-40])
    else:
        if damage == "bad json":
            lines[1] = lines[1][:-5]
        elif damage == "no header":
            lines = lines[1:]
        elif damage == "wrong count":
            lines = lines[:-1]
        elif damage == "NaN":
            lines[2] = lines[2].replace('"top1": ', '"top1": NaN, "x": ', 1)
        elif damage == "run twice":
            head = json.loads(lines[0])
            lines = [json.dumps({**head, "runs": 3}), *lines[1:], lines[2]]
        else:
            rec = json.loads(lines[2])
            DAMAGES[damage](rec)
            lines[2] = json.dumps(rec)
        snap.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    target = tmp_path / "t.sqlite"
    with pytest.raises(ValueError, match=str(snap.name)):
        study_api.import_(path, snap, db=target)
    assert not target.exists(), "a refused import must not even create the store"


def test_export_never_replaces_the_store_a_directory_or_a_file_that_is_not_a_snapshot(
        finished, tmp_path):
    import shutil

    from sparse_repair import study as study_api

    path, src = finished
    db = tmp_path / "db.sqlite"
    shutil.copy(src, db)
    before = db.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is the result store itself"):
            study_api.export(path, db, db=db, overwrite=overwrite)
        notes = tmp_path / "notes.txt"
        notes.write_text("my notes")
        with pytest.raises(ValueError, match="not a study snapshot; refusing to replace it"):
            study_api.export(path, notes, db=db, overwrite=overwrite)
        assert notes.read_text() == "my notes"
        with pytest.raises(ValueError, match="is a directory"):
            study_api.export(path, tmp_path, db=db, overwrite=overwrite)
    assert db.read_bytes() == before
    under = tmp_path / "notes.txt" / "s.gz"
    with pytest.raises(ValueError, match="cannot write the snapshot"):
        study_api.export(path, under, db=db)
    long = tmp_path / ("s" * 240 + ".gz")  # near the name limit: the temporary name is short
    assert study_api.export(path, long, db=db)["runs"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_snapshot_only_grows_per_channel_statistics_are_never_dropped(finished, tmp_path):
    from sparse_repair import study as study_api
    from sparse_repair.study.store import read_snapshot

    path, db = finished
    ids = [rid for rid, _ in load_study(path).runs]
    snap = tmp_path / "s.gz"
    store = Store(db)
    store.export(snap, ids, layer_stats=[])  # results only
    assert not any(r["repair_layers"] for r in read_snapshot(snap)[1].values())
    store.export(snap, ids, layer_stats=None)  # every run's statistics
    store.export(snap, ids, layer_stats=[])  # a later default export keeps them
    store.close()
    assert all(r["repair_layers"] for r in read_snapshot(snap)[1].values())
    # a store without them (imported from a smaller snapshot) may not drop them either ...
    lean, bare = tmp_path / "lean.gz", tmp_path / "bare.sqlite"
    Store(db).export(lean, ids, layer_stats=[])
    study_api.import_(path, lean, db=bare)
    with pytest.raises(ValueError, match="per-channel repair statistics of 2 run"):
        study_api.export(path, snap, db=bare)
    # ... and importing the fuller snapshot adds them to the runs it already has
    study_api.import_(path, snap, db=bare)
    assert _table(bare, "repair_layers") == _table(db, "repair_layers")


def test_run_with_a_snapshot_rewrites_it_after_every_run_and_refuses_a_bad_one_first(
        tmp_path):
    from sparse_repair import study as study_api
    from sparse_repair.study.store import read_snapshot

    path, db, snap = _study(tmp_path, sparsities=(0.9,)), tmp_path / "r.sqlite", tmp_path / "s.gz"
    seen = []
    real = Store.export

    def recording(self, *a, **k):
        n = real(self, *a, **k)
        seen.append(len(read_snapshot(snap)[1]))
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "export", recording)
        assert study_api.run(path, db=db, snapshot=snap).exit_code == 0
    assert seen == [0, 1, 2], "written before the first run and after each"
    # a target export refuses (it holds runs this fresh store lacks) stops the study first
    fresh = tmp_path / "fresh.sqlite"
    with pytest.raises(ValueError, match="holds 2 done run"):
        study_api.run(path, db=fresh, snapshot=snap)
    assert Store(fresh).done() == set()
    r = _cli("run", str(path), "--db", str(fresh), "--snapshot", str(tmp_path / "new.gz"))
    assert r.returncode == 0 and len(read_snapshot(tmp_path / "new.gz")[1]) == 2, r.stderr


def test_cli_exports_and_imports_and_names_a_bad_snapshot(finished, tmp_path):
    path, db = finished
    snap = tmp_path / "s.runs.jsonl.gz"
    r = _cli("export", str(path), "--db", str(db), "--out", str(snap))
    assert r.returncode == 0 and "2 of 2 runs ->" in r.stdout, r.stderr
    r = _cli("import", str(path), str(snap), "--db", str(tmp_path / "n.sqlite"))
    assert r.returncode == 0 and "imported 2 runs" in r.stdout and "2 of 2 runs done" in r.stdout
    r = _cli("run", str(path), "--db", str(tmp_path / "n.sqlite"))
    assert r.returncode == 0 and "0 to run" in r.stdout, "a run after an import must resume"
    (tmp_path / "junk.gz").write_text("junk")
    r = _cli("import", str(path), str(tmp_path / "junk.gz"), "--db", str(tmp_path / "j.sqlite"))
    assert r.returncode != 0 and "not a study snapshot" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "j.sqlite").exists()
    r = _cli("status", str(path), "--db", str(snap))  # a snapshot given as the store
    assert r.returncode == 2 and "as a study result store (SQLite)" in r.stderr, r.stderr
    for command in (["status"], ["report", "--out", str(tmp_path / "rep")]):
        # a mistyped --db is not answered with a new empty store and "0 runs done"
        r = _cli(*command[:1], str(path), "--db", str(tmp_path / "typo.sqlite"), *command[1:])
        assert r.returncode == 2 and "no result store" in r.stderr, r.stderr
        assert not (tmp_path / "typo.sqlite").exists() and "Traceback" not in r.stderr
