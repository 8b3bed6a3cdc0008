"""``repair()``: input checks, option resolution, the BN plan, mode bookkeeping, the all-or-nothing
guarantee and the report around one registered method (``methods.REPAIRS``). Nothing here knows
what a method does.

Order of work (docs/repair.md, "What is supported and refused"): everything that can be checked
is checked before the first write (method, options, calibration images, both models, the BN
plan from one probe forward); the model's exact state is then snapshot, and any exception or
non-finite value afterwards restores it before the error propagates.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .engine import (
    ModelState,
    batchnorms,
    check_dense_forward,
    check_image_channels,
    plan_batchnorms,
)
from .methods import REPAIRS


@dataclass
class RepairReport:
    """What ``repair`` did. ``path``: how the calibration images were run ("onepass": one
    paired pass through a traced graph; "rerun": one forward per BN stage; "none": no forward,
    method none). ``passes_dense`` / ``passes_pruned``: full forward passes of the calibration
    set through each model (the method's cost in model evaluations; 0 for none).
    ``seconds``: wall time of the method alone (s; CUDA synchronized), not of the input checks,
    the probe forward or the snapshot taken for the all-or-nothing restore. ``layers``: the
    method's records in forward order: per BatchNorm for the BN methods (mu_d, sd_d, mu_s,
    sd_s, and rho, kappa, gain where the method computes them: float64 tensors [C]);
    reconstruct: one per Conv2d / Linear (kind, rel_err_before, rel_err_after, cond_h, kept,
    fallback, positions), then bn_recal's per-BN records; none: []. A layer or BN left unchanged
    is ``{"name", "skipped": reason}``. ``to_dict(with_layers=True)`` turns tensors into lists.
    """
    method: str
    options: dict                  # chunk_size and the method's full options (defaults included)
    path: str                      # "onepass", "rerun" or "none"
    passes_dense: int
    passes_pruned: int
    seconds: float
    layers: list[dict] = field(default_factory=list)

    def to_dict(self, with_layers: bool = False) -> dict:
        out = {"method": self.method, "options": self.options, "path": self.path,
               "passes_dense": self.passes_dense, "passes_pruned": self.passes_pruned,
               "seconds": self.seconds}
        if with_layers:
            out["layers"] = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                              for k, v in layer.items()} for layer in self.layers]
        return out

    @property
    def skipped(self) -> dict[str, str]:
        """BNs left unchanged: name -> reason."""
        return {ly["name"]: ly["skipped"] for ly in self.layers if "skipped" in ly}


# ----------------------------------------------------------------------------- input checks

_LABELED = ("calibration is a tuple/list, as a labeled DataLoader yields (images, labels); "
            "repair is label-free and takes images only: pass a tensor of images [N, C, H, W] "
            "or an iterable/generator of such tensors, e.g. "
            "sparse_repair.data.calibration_set(...) or (x for x, _ in loader)")


def as_image_tensor(calibration) -> torch.Tensor:
    """Images only: a float tensor [N, C, H, W], or an iterable (generator, DataLoader) whose
    items are such tensors, returned as one [N, C, H, W] tensor.

    Raises TypeError for any tuple or list, at the top level or as an item (what a labeled
    DataLoader yields), before any element of it is touched: a list of tensors is refused too,
    since [images, labels] and [images, targets] cannot be told from [batch, batch]; TypeError
    for a dict, a non-tensor item (a numpy array: the message names torch.from_numpy),
    non-float images or items whose dtypes differ (torch.cat would promote raw uint8 pixels to
    float silently). ValueError for an empty set (no items, or N = 0 or any other dimension
    0), a shape other than 4-D, items whose [C, H, W] differ, meta tensors, or NaN/Inf.
    """
    if isinstance(calibration, (tuple, list)):
        raise TypeError(_LABELED)
    if isinstance(calibration, torch.Tensor):
        batches = [calibration]
    elif type(calibration).__module__.split(".")[0] == "numpy":
        # iterating an array would yield its images one by one and be refused as "batches"
        raise TypeError(f"calibration is a numpy {type(calibration).__name__}; pass a tensor "
                        f"of images [N, C, H, W]: torch.from_numpy(images) converts it")
    elif isinstance(calibration, (dict, str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be an image tensor [N, C, H, W] or an iterable of "
                        f"image tensors, got {type(calibration).__name__}")
    else:
        batches = []
        for batch in calibration:
            if isinstance(batch, (tuple, list, dict)):
                raise TypeError(_LABELED.replace("calibration is", "calibration batches are"))
            if not isinstance(batch, torch.Tensor):
                hint = (" (torch.from_numpy(batch) converts a numpy array)"
                        if type(batch).__module__.split(".")[0] == "numpy" else "")
                raise TypeError(f"calibration batches must be image tensors, got "
                                f"{type(batch).__name__}{hint}")
            batches.append(batch)
    if not batches:
        raise ValueError("calibration set is empty: the iterable yielded no batch; pass at "
                         "least one image tensor [N, C, H, W] with N >= 1 (e.g. "
                         "sparse_repair.data.calibration_set(dataset, n, seed))")
    for i, b in enumerate(batches):
        if b.dim() != 4:
            where = "" if len(batches) == 1 else f" (batch {i})"
            raise ValueError(f"calibration images must be [N, C, H, W], got shape "
                             f"{tuple(b.shape)}{where}")
        if b.dtype != batches[0].dtype:
            # torch.cat would promote a uint8 batch to float silently: raw 0-255 pixels beside
            # normalized images
            raise TypeError(f"calibration batches differ in dtype: batch 0 is "
                            f"{batches[0].dtype}, batch {i} is {b.dtype}; pass normalized float "
                            f"images in every batch (sparse_repair.data.calibration_set)")
        if b.device.type == "meta":
            raise ValueError("calibration images are on the meta device, which holds no "
                             "values; load them on a real device")
        if b.shape[1:] != batches[0].shape[1:]:
            raise ValueError(f"calibration batches differ in [C, H, W]: batch 0 is "
                             f"{tuple(batches[0].shape)}, batch {i} is {tuple(b.shape)}")
    x = torch.cat(batches) if len(batches) > 1 else batches[0]
    if x.numel() == 0:
        raise ValueError(f"calibration set is empty (shape {tuple(x.shape)}); pass images "
                         f"[N, C, H, W] with every dimension >= 1 (e.g. "
                         f"sparse_repair.data.calibration_set(dataset, n, seed))")
    if not torch.is_floating_point(x):
        raise TypeError(f"calibration images have dtype {x.dtype}; pass normalized float images "
                        "(sparse_repair.data.calibration_set returns them)")
    bad = ~torch.isfinite(x)
    if bad.any():
        images = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"calibration images contain NaN or Inf ({len(images)} of {len(x)} "
                         f"images, first at index {images[:5]}); drop or re-load those images "
                         f"(a division by a zero std in normalization is the usual cause)")
    return x


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _channels(bad: torch.Tensor) -> str:
    idx = bad.flatten().nonzero().flatten().tolist()
    return f"{len(idx)} of {bad.numel()} values, first at {idx[:5]}"


def check_model(model: nn.Module, role: str) -> tuple[torch.device, torch.dtype]:
    """Refuse a model that cannot be repaired as given; return its device and dtype.

    ``role`` ("pruned" or "dense") names the model in every message. Raises TypeError when it
    is not an nn.Module; ValueError for an uninitialised lazy module (a forward would create
    its parameters, changing the model), no parameters or buffers, tensors on several devices
    or on the meta device, a non-finite parameter or buffer (named; a BN's running statistics
    are blamed on the input model, not on the repair), a negative running_var or a BatchNorm
    eps <= 0 (a dead channel would divide by zero). The dtype is that of the floating
    parameters and buffers when they agree, else that of the first floating parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{role} must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"{role} module {name!r} ({type(m).__name__}) is uninitialised: "
                             "run one forward pass first (e.g. model(images[:2])) so that its "
                             "parameters exist; repair would otherwise create them")
    tensors = _tensors(model)
    if not tensors:
        raise ValueError(f"the {role} model has no parameters or buffers")
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"the {role} model is spread over devices {sorted(map(str, devices))}; "
                         "repair runs a model on one device")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError(f"the {role} model is on the meta device: its tensors have no values")
    bn_of = {f"{n}.{b}" if n else b: n for n in batchnorms(model)
             for b in ("running_mean", "running_var", "weight", "bias")}
    for name, t in tensors:
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bad.any():
                what = (f"BatchNorm {bn_of[name]!r} has a non-finite {name.rsplit('.', 1)[1]}"
                        if name in bn_of else f"parameter or buffer {name!r} is non-finite")
                raise ValueError(f"the {role} model is broken: {what} ({_channels(bad)}); "
                                 "repair did not run and changed nothing")
    for name, bn in batchnorms(model).items():
        if bn.running_var is not None and (bn.running_var < 0).any():
            raise ValueError(f"the {role} model is broken: BatchNorm {name!r} has a negative "
                             f"running_var ({_channels(bn.running_var < 0)}); repair did not "
                             "run and changed nothing")
        if not bn.eps > 0:
            raise ValueError(f"the {role} model's BatchNorm {name!r} has eps={bn.eps}; repair "
                             "needs eps > 0 (a fully pruned channel has variance 0)")
    floats = [t.dtype for _, t in tensors if t.is_floating_point()]
    params = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if len(set(floats)) == 1 else (params or floats or [torch.float32])[0]
    return device, dtype


def _structure(model: nn.Module) -> dict[str, tuple]:
    """name -> (kind, shape, dtype) of every parameter and buffer, with torch.nn.utils.prune's
    reparametrisation undone (``X_orig`` + buffer ``X_mask`` is parameter ``X``)."""
    out = {}
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for kind, tensors in (("parameter", m._parameters), ("buffer", m._buffers)):
            for k, t in tensors.items():
                if t is None:
                    continue
                if kind == "buffer" and k.endswith("_mask") and f"{k[:-5]}_orig" in m._parameters:
                    continue
                if kind == "parameter" and k.endswith("_orig") and f"{k[:-5]}_mask" in m._buffers:
                    k = k[:-5]
                out[prefix + k] = (kind, tuple(t.shape), t.dtype)
    return out


def _storages(model: nn.Module) -> dict[int, str]:
    return {t.untyped_storage().data_ptr(): n for n, t in _tensors(model) if t.numel() > 0}


def check_dense(pruned: nn.Module, dense: nn.Module) -> None:
    """Refuse a dense model that is not the unpruned copy of ``pruned``. Raises ValueError
    naming dense when it is ``pruned`` itself, shares a parameter or buffer with it (a shallow
    copy: repairing one would change the other), has other parameter/buffer names, shapes or
    dtypes, or is on another device; the model checks of ``check_model`` apply to it too."""
    if dense is pruned:
        raise ValueError("dense is the pruned model itself; pass the unpruned model (a copy "
                         "made before pruning, e.g. dense = copy.deepcopy(model) before prune_)")
    d_dev, _ = check_model(dense, "dense")
    p_dev = next(t.device for _, t in _tensors(pruned))
    shared = set(_storages(pruned)) & set(_storages(dense))
    if shared:
        name = _storages(dense)[min(shared)]
        raise ValueError(f"dense shares tensor {name!r} (and {len(shared) - 1} more) with the "
                         "pruned model; pass an independent copy (copy.deepcopy before pruning)")
    sp, sd = _structure(pruned), _structure(dense)
    if sp.keys() != sd.keys():
        only_d, only_p = sorted(sd.keys() - sp.keys()), sorted(sp.keys() - sd.keys())
        parts = [f"{len(names)} only in {who} (e.g. {', '.join(names[:3])})"
                 for who, names in (("dense", only_d), ("pruned", only_p)) if names]
        raise ValueError(f"dense does not match pruned: parameter/buffer names differ: "
                         f"{'; '.join(parts)}; pass the unpruned copy of the pruned model")
    for name, (kind, shape, dtype) in sp.items():
        if sd[name][1:] != (shape, dtype):
            raise ValueError(f"dense does not match pruned: {kind} {name!r} is "
                             f"{list(sd[name][1])} {sd[name][2]} in dense but {list(shape)} "
                             f"{dtype} in pruned; pass the unpruned copy of the pruned model")
    if d_dev != p_dev:
        raise ValueError(f"dense is on {d_dev} but pruned on {p_dev}; move both to one device")


def _check_values_per_channel(impl, plan, n_images: int) -> None:
    """A method's ``min_values_per_channel`` (bn_recal: 2, for the unbiased variance
    m2 / (n - 1)) must be met at every BN it repairs."""
    need = impl.min_values_per_channel
    for name in plan.order:
        if n_images * plan.values_per_image[name] < need:
            raise ValueError(f"{impl.name}: BatchNorm {name!r} sees "
                             f"{n_images * plan.values_per_image[name]} value per channel over "
                             f"the calibration set; it needs at least {need}")


# ----------------------------------------------------------------------------- repair

def repair(pruned: nn.Module, method: str, calibration, *, dense: nn.Module | None = None,
           chunk_size: int = 256, **options) -> RepairReport:
    """Repair ``pruned`` in place from unlabeled ``calibration`` images; returns a report.
    All or nothing: on any error the model is left exactly as it was.

    ``calibration``: see ``as_image_tensor`` (a tensor or an iterable of tensors; never a tuple
    or list). It is cast to the pruned model's dtype (``check_model``), moved to its device and
    split into chunks of ``chunk_size`` images; no statistic depends on the chunking.
    ``dense``: the unpruned model, required by methods with ``needs_dense``; checked whenever
    given (``check_dense``). ``options`` are the fields of the method's options dataclass
    (``REPAIRS[method].Options``; e.g. asr: shrinkage, scope, path, memory_limit_gb); the
    report's ``options`` is chunk_size plus that dataclass in full, defaults included. The
    report's ``layers`` holds the method's records (``RepairReport``): per BatchNorm for the BN
    methods, ``{"name", "skipped": reason}`` for one the plan leaves unchanged
    (``engine.plan_batchnorms``); per Conv2d / Linear then per BatchNorm for reconstruct; none
    for none.

    Raises, before the model is touched: ValueError for an unknown method, TypeError for an
    option the method does not have (naming the valid ones), ValueError for a bad option value
    or chunk_size, for dense=None where the method needs the dense model, or for a model without
    a BatchNorm it can repair where the method needs one; the errors of ``as_image_tensor``,
    ``check_model`` (pruned and dense) and ``check_dense``; ValueError when the first layer
    expects another channel count, when a dense model's forward differs from pruned's
    (``engine.check_dense_forward``), or for bn_recal when a BN sees fewer than 2 values per
    channel, or for calibration images outside the model's dtype range; for reconstruct,
    ValueError when no Conv2d / Linear of the model can be refit (a UserWarning names layers
    left as pruned because their solve exceeds ``max_solve_gflop``). With path="onepass",
    RuntimeError when the model does not trace with torch.fx and ``engine.FrontierTooLarge`` (a
    RuntimeError) when live activations exceed ``memory_limit_gb`` (path="auto" falls back to
    "rerun" instead). Whatever the probe forward raises propagates. During the repair, any
    exception, and
    FloatingPointError for a non-finite or out-of-range result, restores every parameter and
    buffer of ``pruned`` bit for bit, its modules' training flags, BN momenta and requires_grad
    flags, then propagates. Training flags of ``pruned`` and ``dense`` are restored in any case.
    """
    if not isinstance(method, str) or method not in REPAIRS:
        raise ValueError(f"unknown repair method {method!r}; choose one of {', '.join(REPAIRS)}")
    impl = REPAIRS[method]
    opts = impl.resolve(**options)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of images, got {chunk_size!r}")
    if impl.needs_dense and dense is None:
        raise ValueError(f"{method} compares the pruned model with the dense one: pass "
                         "dense=<the unpruned model>")
    if not isinstance(pruned, nn.Module):
        raise TypeError(f"pruned must be a torch.nn.Module, got {type(pruned).__name__}")
    if impl.needs_bn and not batchnorms(pruned):
        raise ValueError(f"{method} repairs BatchNorm statistics but the model has no BatchNorm "
                         "layer; use a model with BatchNorm or method 'none'")
    x = as_image_tensor(calibration)
    device, dtype = check_model(pruned, "pruned")
    if dense is not None:
        check_dense(pruned, dense)
    largest = float(x.abs().max())
    x = x.to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"calibration images overflow the pruned model's dtype {dtype} "
                         f"(largest |value| {largest:.4g})")
    chunks = list(torch.split(x, chunk_size))
    used_dense = dense if impl.needs_dense else None
    dense_modes = ModelState(dense.modules(), values=False) if dense is not None else None
    state = ModelState(pruned.modules())
    pruned.eval()
    if dense is not None:
        dense.eval()
    try:
        with torch.no_grad():
            plan = None
            if impl.needs_bn:
                plan = plan_batchnorms(pruned, x[:2])
                if not plan.order:
                    raise ValueError(f"{method}: no BatchNorm of the model can be repaired: "
                                     + "; ".join(f"{n}: {r}" for n, r in plan.skipped.items()))
                _check_values_per_channel(impl, plan, x.shape[0])
                if used_dense is not None:
                    check_dense_forward(pruned, used_dense, x[:2], plan)
            else:
                # The BN plan's probe forward is also the channel check; methods without it
                # probe too, so 1-channel images reach a 3-channel model as the same
                # ValueError, not as a raw conv error from inside the method's graph walk.
                # The dense model is not probed: check_dense matched its parameter shapes, and
                # reconstruct with target "pruned" never runs it.
                check_image_channels(pruned, x[:2], "pruned")
            start = time.perf_counter()
            result = impl.run(opts, pruned, used_dense, chunks, plan)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        for name, t in _tensors(pruned):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FloatingPointError(f"{method} produced a non-finite {name!r} from finite "
                                         "inputs; the model was restored; please report")
    except BaseException:
        state.restore()
        raise
    finally:
        state.restore_modes()
        if dense_modes is not None:
            dense_modes.restore_modes()
    return RepairReport(method, {"chunk_size": chunk_size, **dataclasses.asdict(opts)},
                        result.path, result.passes_dense, result.passes_pruned, seconds,
                        result.layers)
