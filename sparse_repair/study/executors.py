"""Where the runs of a study execute. Executors only compute: each run's result rows and
per-layer data go back to the driver (``driver.sweep``), the only process that writes SQLite, so
concurrent workers can never corrupt the database.

    local   in-process, one run after another (default)
    ray     Ray core: one task per run; ``num_gpus`` per task for CUDA studies, else ``num_cpus``;
            an existing cluster (``--ray-address``) or a local one started here
    slurm   submitit job arrays: one array task per run, GPUs/partition/time as options;
            ``cluster="local"`` runs the array as local subprocesses (tests, laptops)

Retries live in the driver, the same for every executor: a run that raises, or whose worker
dies, is submitted again up to ``retries`` times, and every attempt is counted in the store.
Workers find data and weights through the asset root (a path on the shared filesystem that
the driver resolves and hands over), never through pickled data sets.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..assets import asset_root, set_asset_root
from ..run import RunConfig

EXECUTORS = ("local", "ray", "slurm")
# The executors that read each backend option. Another executor would accept the option and
# never act on it (--executor local --cpus-per-task 4 ran one run at a time), so a value other
# than the default is refused there.
USED_BY = {"cpus_per_task": ("ray", "slurm"), "gpus_per_task": ("ray", "slurm"),
           "ray_address": ("ray",), "slurm_cluster": ("slurm",), "slurm_partition": ("slurm",),
           "slurm_time_min": ("slurm",), "slurm_parallelism": ("slurm",),
           "slurm_folder": ("slurm",), "poll_s": ("slurm",)}


@dataclass
class ExecutorConfig:
    name: str = "local"                 # one of EXECUTORS
    retries: int = 2                    # extra attempts for a run that raises or whose worker dies
    cpus_per_task: int = 1              # CPU slots per run (ray, slurm)
    gpus_per_task: int | None = None    # None: 1 for a CUDA study, else 0 (ray, slurm)
    ray_address: str | None = None      # "auto", "ray://head:10001", ...; None: start a local one
    slurm_cluster: str | None = None    # None: submitit's auto-detection; "local" for tests
    slurm_partition: str | None = None
    slurm_time_min: int = 60            # wall-clock limit of one array task (minutes)
    slurm_parallelism: int = 64         # array tasks running at once
    slurm_folder: str = "results/slurm/%j"  # submitit logs and pickles; on the shared filesystem
    poll_s: float = 2.0                 # slurm: seconds between job-state polls

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ValueError(f"unknown executor {self.name!r}; choose one of {EXECUTORS}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0 (extra attempts per run), got {self.retries}")
        for f in fields(self):
            users = USED_BY.get(f.name)
            value = getattr(self, f.name)
            if users and self.name not in users and value != f.default and \
                    str(value) != str(f.default):  # Path("results/slurm/%j") is the default
                raise ValueError(f"{f.name} applies to executor {' and '.join(users)} only, and "
                                 f"executor {self.name!r} would ignore it; drop it or choose "
                                 f"{' or '.join(users)}")
        for name in ("ray_address", "slurm_cluster", "slurm_partition", "slurm_folder"):
            v = getattr(self, name)
            if v is not None and not str(v).strip():  # "" fell back to the default silently
                raise ValueError(f"{name} is empty; name one, or leave it out (None) for the "
                                 f"default")

    def gpus(self, device: str) -> int:
        """GPUs per task: the explicit option, else one for a CUDA study."""
        return self.gpus_per_task if self.gpus_per_task is not None else \
            int(device.startswith("cuda"))


@dataclass
class Outcome:
    rid: str
    cfg: RunConfig
    attempts: int                       # submissions of this run in this invocation
    rows: list[dict] | None = None      # on success
    dense_top1: float | None = None
    allocation: list[dict] | None = None  # per-layer allocation (`run.allocation_table`)
    repair_layers: dict[str, list[dict]] | None = None  # {repair: per-BN statistics}
    wall_s: float | None = None         # worker wall time of the successful attempt
    error: str | None = None            # on failure: the last attempt's traceback

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- worker side

_DENSE: dict = {}   # per worker process: a dense model is loaded and evaluated once


def execute_run(cfg: RunConfig, dense_cache: dict) -> dict:
    """One run (prune once, every repair on its own copy). Returns {"rows": ``run_single``'s
    rows without per-layer data, "dense_top1": float, "allocation": `run.allocation_table`,
    "repair_layers": {repair: per-BN statistics} for repairs whose rows carry them}."""
    from ..run import run_config

    rows, dense_top1, allocation = run_config(cfg, dense_cache)
    # Per-BN statistics leave the rows: the results table holds one line per repair, the
    # repair_layers table the statistics (run_single rows carry them under "layers" once
    # run.py stores each RepairReport's to_dict(with_layers=True)["layers"] there).
    repair_layers = {r["repair"]: _plain(layers) for r in rows
                     if (layers := r.pop("layers", None))}
    return {"rows": rows, "dense_top1": dense_top1,
            "allocation": allocation, "repair_layers": repair_layers}


def _plain(layers: list[dict]) -> list[dict]:
    """Per-BN statistics as plain Python (tensors and arrays to lists of float), so they pickle
    back from any engine and go to JSON in the store."""
    return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in ly.items()}
            for ly in layers]


def run_task(cfg: dict, assets: str) -> dict:
    """What a worker runs for one run: plain dicts in and out, so any engine can ship it.
    ``assets`` is the driver's absolute asset root, made this worker's (`set_asset_root`)."""
    from ..runtime import tune_allocator

    set_asset_root(assets)
    tune_allocator()  # worker processes are entry points too (docs in runtime.py)
    start = time.perf_counter()
    out = execute_run(RunConfig(**cfg), _DENSE)
    return {**out, "wall_s": time.perf_counter() - start}


TaskFn = Callable[[dict, str], dict]


class ExecutorLost(RuntimeError):
    """The executor itself went away (not one run): its in-flight runs stay pending."""


def _call(fn: TaskFn, cfg: dict, assets: str) -> dict:
    # Ray remotes need a plain function; the task function (possibly a partial) is an argument.
    return fn(cfg, assets)


# ----------------------------------------------------------------------------- backends
# A backend submits tasks and reports which have finished; the driver loop below owns
# retries and outcomes. result() returns the task's dict or raises with the worker's error.

class _Call:
    """A deferred local call; hashable by identity, like Ray's and submitit's handles."""

    def __init__(self, args: tuple[dict, str]) -> None:
        self.args = args


class _Local:
    def __init__(self, ec: ExecutorConfig, fn: TaskFn, device: str) -> None:
        self.fn = fn

    def submit(self, items: list[tuple[dict, str]]) -> list:
        return [_Call(item) for item in items]

    def wait(self, handles: list) -> list:
        return handles[:1]

    def result(self, handle: _Call) -> dict:
        return self.fn(*handle.args)

    def lost(self, exc: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


def _missing_extra(extra: str, module: str) -> ModuleNotFoundError:
    # ModuleNotFoundError, not RuntimeError: the CLI prints it as one line and exits 2 (the
    # message names the extra), where a RuntimeError ended in a traceback
    return ModuleNotFoundError(f"--executor {extra} needs the {module!r} package, which is "
                               f"not installed; install the extra: pip install "
                               f"'sparse-repair[{extra}]'")


class _Ray:
    def __init__(self, ec: ExecutorConfig, fn: TaskFn, device: str) -> None:
        try:
            import ray
        except ImportError as e:
            raise _missing_extra("ray", "ray") from e
        self.ray = ray
        self.started = False
        if ray.is_initialized() and ec.ray_address is not None:
            raise ValueError(f"ray_address={ec.ray_address!r}, but Ray is already initialised "
                             f"in this process and would stay on its cluster; call ray."
                             f"shutdown() first or leave ray_address out")
        if not ray.is_initialized():
            # address None starts a local cluster sized to this machine; "auto" or an address
            # joins an existing one.
            ray.init(address=ec.ray_address, include_dashboard=False, log_to_driver=False)
            self.started = True
        gpus = ec.gpus(device)
        # max_retries=0: the driver retries, so every attempt is counted the same way on every
        # executor (Ray's own retries would be invisible to the store).
        self.fn = fn
        self.remote = ray.remote(_call).options(num_cpus=ec.cpus_per_task, num_gpus=gpus,
                                                max_retries=0)

    def submit(self, items):
        return [self.remote.remote(self.fn, cfg, assets) for cfg, assets in items]

    def wait(self, handles):
        ready, _ = self.ray.wait(handles, num_returns=1)
        return ready

    def result(self, handle):
        return self.ray.get(handle)

    def lost(self, exc: BaseException) -> bool:
        # A dead raylet fails every task at once (seen here: Ctrl-C then `ray stop` during a
        # sweep once recorded every pending run as failed after 3 attempts); that is the cluster
        # gone, not the runs failing. A crashed worker (WorkerCrashedError) stays a run failure.
        err = self.ray.exceptions
        return isinstance(exc, (err.LocalRayletDiedError, err.RaySystemError))

    def close(self):
        if self.started:
            self.ray.shutdown()


class _Slurm:
    def __init__(self, ec: ExecutorConfig, fn: TaskFn, device: str) -> None:
        try:
            import submitit
        except ImportError as e:
            raise _missing_extra("slurm", "submitit") from e
        self.fn, self.poll_s = fn, ec.poll_s
        self.ex = submitit.AutoExecutor(folder=ec.slurm_folder, cluster=ec.slurm_cluster)
        gpus = ec.gpus(device)
        params = {"timeout_min": ec.slurm_time_min, "cpus_per_task": ec.cpus_per_task,
                  "slurm_array_parallelism": ec.slurm_parallelism}
        if gpus:
            params["gpus_per_node"] = gpus
        if ec.slurm_partition:
            params["slurm_partition"] = ec.slurm_partition
        self.ex.update_parameters(**params)

    def submit(self, items):
        with self.ex.batch():   # one job array per submission round
            jobs = [self.ex.submit(self.fn, cfg, assets) for cfg, assets in items]
        return jobs

    def wait(self, handles):
        while True:
            done = [j for j in handles if j.done()]
            if done:
                return done
            time.sleep(self.poll_s)

    def result(self, handle):
        return handle.result()

    def lost(self, exc: BaseException) -> bool:
        return False

    def close(self):
        pass


BACKENDS = {"local": _Local, "ray": _Ray, "slurm": _Slurm}


def _check_devices(tasks: list[tuple[str, RunConfig]], ec: ExecutorConfig) -> None:
    devices = sorted({c.device for _, c in tasks})
    if ec.gpus_per_task is None and ec.name != "local" and \
            len({d.startswith("cuda") for d in devices}) > 1:
        # the GPU reservation is one number for every task, taken from the device
        raise ValueError(f"the runs use devices {devices}: CUDA and CPU runs would get the same "
                         f"GPU reservation; pass --gpus-per-task N (gpus_per_task), or run the "
                         f"CPU and CUDA models as separate studies")


def preflight(tasks: list[tuple[str, RunConfig]], ec: ExecutorConfig,
              assets: str | os.PathLike | None = None) -> None:
    """What ``execute`` would refuse, checked before a caller creates anything (the store):
    the asset root (an empty one), the executor's extra (ModuleNotFoundError naming the
    install) and a CUDA/CPU device mix without ``gpus_per_task``."""
    asset_root(assets)
    module = {"ray": "ray", "slurm": "submitit"}.get(ec.name)
    if module is not None:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as e:
            raise _missing_extra(ec.name, module) from e
    _check_devices(tasks, ec)


def execute(tasks: list[tuple[str, RunConfig]], ec: ExecutorConfig,
            assets: str | os.PathLike | None = None, fn: TaskFn = run_task
            ) -> Iterator[Outcome]:
    """Run every task on the chosen executor and yield one Outcome per run as runs finish
    (completion order, not grid order). ``fn`` is what a worker runs; tests substitute a
    faulty one."""
    if not tasks:
        return
    root = str(Path(asset_root(assets)).resolve())
    device = tasks[0][1].device
    _check_devices(tasks, ec)
    backend = BACKENDS[ec.name](ec, fn, device)
    attempts = {rid: 1 for rid, _ in tasks}
    inflight = dict(zip(backend.submit([(asdict(c), root) for _, c in tasks]), tasks))
    try:
        while inflight:
            for handle in backend.wait(list(inflight)):
                rid, cfg = inflight.pop(handle)
                try:
                    res = backend.result(handle)
                except Exception as exc:
                    if backend.lost(exc):
                        raise ExecutorLost(
                            f"executor {ec.name!r} went away while runs were in flight "
                            f"({type(exc).__name__}); finished runs are saved and the rest "
                            f"stay pending: rerun the same command to resume") from exc
                    if attempts[rid] <= ec.retries:
                        attempts[rid] += 1
                        (h,) = backend.submit([(asdict(cfg), root)])
                        inflight[h] = (rid, cfg)
                        continue
                    yield Outcome(rid, cfg, attempts[rid], error=traceback.format_exc())
                    continue
                # .get: a substituted task function may return no per-layer data
                yield Outcome(rid, cfg, attempts[rid], rows=res["rows"],
                              dense_top1=res["dense_top1"], wall_s=res.get("wall_s"),
                              allocation=res.get("allocation"),
                              repair_layers=res.get("repair_layers"))
    finally:
        backend.close()
