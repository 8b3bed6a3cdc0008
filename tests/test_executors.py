"""Executors: Ray and submitit give the same result rows as the local executor, resume across
executors, retry failing runs, and record runs that keep failing with their traceback."""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from sparse_repair.run import RunConfig
from sparse_repair.study import api, executors
from sparse_repair.study.cli import format_status
from sparse_repair.study.executors import ExecutorConfig, ExecutorLost, run_task
from sparse_repair.study.spec import run_id

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt"
# Columns that legitimately differ between executors: timings, write time, host description.
VOLATILE = {"seconds", "created", "env"}


def _study(tmp_path: Path, name: str, sparsities=(0.8, 0.9), extra_model: str = "") -> Path:
    f = tmp_path / f"{name}.toml"
    f.write_text(f"""name = "{name}"
calib = 128
n_eval = "full"
seeds = [0]
allocations = ["erk", "lamp"]
sparsities = {list(sparsities)}
repairs = ["none", "bn_recal", "asr"]
[[models]]
model = "resnet8"
dataset = "digits"
weights = "{CKPT.as_posix()}"
{extra_model}""")
    return f


BROKEN_MODEL = """[[models]]
model = "resnet8"
dataset = "digits"
weights = "no-such-checkpoint.pt"
sparsities = [0.9]
allocations = ["erk"]
"""


def _run(study: Path, db: Path, executor: str, fn=None, **opts) -> int:
    """The study's exit status (0 all done, 1 some run failed), through the Python API."""
    return api.run(study, db=db, executor=executor, fn=fn, **opts).exit_code


def _rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as c:
        cur = c.execute("SELECT * FROM results ORDER BY run_id, repair")
        names = [d[0] for d in cur.description]
        return [{k: v for k, v in zip(names, r) if k not in VOLATILE} for r in cur.fetchall()]


def _runs(db: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(db) as c:
        return {r[0]: (r[1], r[2]) for r in c.execute("SELECT run_id, status, attempts FROM runs")}


def crash_first_attempt(cfg: dict, assets: str, marker_dir: str) -> dict:
    """A worker that dies (os._exit, no exception, no cleanup) the first time it sees a run."""
    marker = Path(marker_dir) / run_id(RunConfig(**cfg))
    if not marker.exists():
        marker.touch()
        os._exit(3)
    return run_task(cfg, assets)


def raise_first_attempt(cfg: dict, assets: str, marker_dir: str) -> dict:
    marker = Path(marker_dir) / run_id(RunConfig(**cfg))
    if not marker.exists():
        marker.touch()
        raise RuntimeError("injected failure on the first attempt")
    return run_task(cfg, assets)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    study, db = _study(tmp, "same"), tmp / "local.sqlite"
    assert _run(study, db, "local") == 0
    return _rows(db)


def _ship_by_value(cloudpickle) -> None:
    """The faulty worker functions live in this test module, which workers cannot import:
    pickle the module's functions by value."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (start-up costs seconds); two logical GPUs so that
    GPU-slot scheduling is exercised on a CPU-only machine."""
    ray = pytest.importorskip("ray", reason="install the extra: pip install -e '.[ray]'")
    _ship_by_value(pytest.importorskip("ray.cloudpickle"))
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- local


@pytest.mark.parametrize("executor, module", [("ray", "ray"), ("slurm", "submitit")])
def test_missing_executor_extra_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys,
                                                               executor, module):
    """Without the extra the CLI prints one line with the install command and exits 2 (it was
    a RuntimeError, i.e. a traceback), and no run is recorded."""
    from sparse_repair.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    study, db = _study(tmp_path, "noextra"), tmp_path / "noextra.sqlite"
    assert main(["study", "run", str(study), "--db", str(db), "--executor", executor]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'sparse-repair[{executor}]'" in err and "Traceback" not in err
    assert not db.exists(), "refused before the store is created"


def test_executor_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        ExecutorConfig(name="dask")


@pytest.mark.parametrize("kw, match", [
    # accepted before and never acted on
    ({"name": "local", "cpus_per_task": 4}, r"cpus_per_task applies to executor ray and slurm"),
    ({"name": "ray", "slurm_partition": "gpu"}, r"slurm_partition applies to executor slurm"),
    ({"name": "slurm", "ray_address": "auto"}, r"ray_address applies to executor ray only"),
    ({"name": "slurm", "slurm_partition": ""}, r"slurm_partition is empty"),
])
def test_an_option_the_chosen_executor_would_ignore_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ExecutorConfig(**kw)
    ExecutorConfig(name=kw["name"])  # the defaults are accepted everywhere


def test_a_study_mixing_cuda_and_cpu_runs_needs_an_explicit_gpu_reservation(tmp_path):
    """The reservation is one number for every task, taken from one run's device: CPU runs
    reserved a GPU, or CUDA runs none. Refused before any submission."""
    tasks = [(str(i), RunConfig(model="resnet8", dataset="digits", device=d))
             for i, d in enumerate(("cpu", "cuda"))]
    with pytest.raises(ValueError, match=r"pass --gpus-per-task N"):
        next(executors.execute(tasks, ExecutorConfig(name="slurm")))
    study = _study(tmp_path, "mixed", sparsities=(0.9,),
                   extra_model=f'[[models]]\nmodel = "resnet8"\ndataset = "digits"\n'
                               f'weights = "{CKPT.as_posix()}"\ndevice = "cuda"\n')
    db = tmp_path / "mixed.sqlite"
    with pytest.raises(ValueError, match=r"pass --gpus-per-task N"):
        api.run(study, db=db, executor="slurm", slurm_cluster="local")
    assert not db.exists(), "refused before the store is created"


def test_local_retry_recovers_a_failing_run(tmp_path):
    study, db = _study(tmp_path, "retry", sparsities=(0.9,)), tmp_path / "r.sqlite"
    fn = functools.partial(raise_first_attempt, marker_dir=str(tmp_path))
    assert _run(study, db, "local", fn=fn, retries=1) == 0
    assert all(v == ("done", 2) for v in _runs(db).values()), (
        f"each run should be done on its second attempt: {_runs(db)}")


def test_run_that_keeps_failing_is_recorded_and_sweep_continues(tmp_path, capsys):
    study = _study(tmp_path, "broken", extra_model=BROKEN_MODEL)
    db = tmp_path / "b.sqlite"
    assert _run(study, db, "local", retries=2) == 1, "a failed run must make the command fail"
    runs = _runs(db)
    failed = {k: v for k, v in runs.items() if v[0] == "failed"}
    assert len(failed) == 1 and list(failed.values())[0][1] == 3, (
        f"the broken run should fail after 1 + 2 retries: {runs}")
    assert sum(v[0] == "done" for v in runs.values()) == 4, "the other runs must still finish"
    with sqlite3.connect(db) as c:
        err = c.execute("SELECT error FROM runs WHERE status='failed'").fetchone()[0]
    assert "Traceback" in err and "no-such-checkpoint.pt" in err, err
    print(format_status(api.status(study, db=db)))  # what `sparse-repair study status` prints
    out = capsys.readouterr().out
    assert "1 failed" in out and "3 attempts" in out and "no-such-checkpoint.pt" in out, out
    assert "resnet8/digits: worker wall time per run median" in out, \
        "status should report run times per model and data set"
    assert "worker-hours)" in out, "status should report the total worker time (the study's cost)"


# ----------------------------------------------------------------------------- ray


def test_ray_rows_equal_local(tmp_path, ray_cluster, local_reference):
    db = tmp_path / "ray.sqlite"
    assert _run(_study(tmp_path, "same"), db, "ray", gpus_per_task=1) == 0
    assert _rows(db) == local_reference, "Ray and local executors disagree on result rows"


def test_ray_resumes_what_local_started(tmp_path, ray_cluster, local_reference):
    db = tmp_path / "mixed.sqlite"
    assert _run(_study(tmp_path, "same", sparsities=(0.8,)), db, "local") == 0
    before = _runs(db)
    assert _run(_study(tmp_path, "same"), db, "ray") == 0
    after = _runs(db)
    assert all(after[k] == v for k, v in before.items()), "finished runs were submitted again"
    assert _rows(db) == local_reference


def test_ray_retries_a_dead_worker(tmp_path, ray_cluster):
    study, db = _study(tmp_path, "crash", sparsities=(0.9,)), tmp_path / "c.sqlite"
    fn = functools.partial(crash_first_attempt, marker_dir=str(tmp_path))
    assert _run(study, db, "ray", fn=fn, retries=1) == 0
    assert all(v == ("done", 2) for v in _runs(db).values()), _runs(db)


def test_ray_records_a_run_that_keeps_failing(tmp_path, ray_cluster):
    study = _study(tmp_path, "rbroken", sparsities=(0.9,), extra_model=BROKEN_MODEL)
    db = tmp_path / "rb.sqlite"
    assert _run(study, db, "ray", retries=1) == 1
    runs = _runs(db)
    assert sorted(runs.values()) == [("done", 1), ("done", 1), ("failed", 2)], runs


# ----------------------------------------------------------------------------- submitit


@pytest.fixture
def submitit_local(tmp_path):
    pytest.importorskip("submitit", reason="install the extra: pip install -e '.[slurm]'")
    import cloudpickle

    _ship_by_value(cloudpickle)
    return {"slurm_cluster": "local", "slurm_folder": str(tmp_path / "submitit" / "%j"),
            "poll_s": 0.2}


def test_submitit_rows_equal_local(tmp_path, submitit_local, local_reference):
    db = tmp_path / "slurm.sqlite"
    assert _run(_study(tmp_path, "same"), db, "slurm", **submitit_local) == 0
    assert _rows(db) == local_reference, "submitit and local executors disagree on result rows"


def test_submitit_retries_a_dead_worker(tmp_path, submitit_local):
    study, db = _study(tmp_path, "scrash", sparsities=(0.9,)), tmp_path / "sc.sqlite"
    fn = functools.partial(crash_first_attempt, marker_dir=str(tmp_path))
    assert _run(study, db, "slurm", fn=fn, retries=1, **submitit_local) == 0
    assert all(v == ("done", 2) for v in _runs(db).values()), _runs(db)


class _VanishingBackend:
    """A backend whose cluster dies: every result raises, and it says the executor is lost."""

    def __init__(self, ec, fn, device):
        self.submitted = 0

    def submit(self, items):
        self.submitted += len(items)
        return [object() for _ in items]

    def wait(self, handles):
        return handles[:1]

    def result(self, handle):
        raise ConnectionError("raylet died")

    def lost(self, exc):
        return isinstance(exc, ConnectionError)

    def close(self):
        pass


def test_a_lost_executor_stops_the_sweep_without_recording_failures(tmp_path, monkeypatch):
    monkeypatch.setitem(executors.BACKENDS, "local", _VanishingBackend)
    cfg = RunConfig(model="resnet8", dataset="digits", allocation="erk", sparsity=0.8,
                    repairs=["bn_recal"], weights=str(CKPT))
    tasks = [(run_id(cfg), cfg)]
    outcomes = []
    with pytest.raises(ExecutorLost, match="rerun the same command"):
        for out in executors.execute(tasks, ExecutorConfig(name="local", retries=2),
                                     assets=tmp_path):
            outcomes.append(out)
    assert outcomes == [], (
        "runs in flight when the executor dies must stay pending, not be recorded as failed")


def test_ray_classifies_a_dead_raylet_as_lost_and_a_crashed_worker_as_a_run_failure():
    ray = pytest.importorskip("ray")
    backend = executors._Ray.__new__(executors._Ray)
    backend.ray = ray
    assert backend.lost(ray.exceptions.LocalRayletDiedError()), \
        "a dead raylet fails every task at once: that is the cluster gone, not the runs"
    assert not backend.lost(ray.exceptions.WorkerCrashedError()), \
        "a crashed worker is one run failing and must go through the driver's retries"
