"""Repair methods: one small class each, with a frozen options dataclass and its metadata, kept
in the registry ``REPAIRS`` (name -> instance) by ``@register``.

A method says what it does, never how the models are run: a ``PairedMethod`` supplies
``update``, its step at one BatchNorm given the pooled moments of that BN's input (definitions
in docs/repair.md), and the engine (``engine.run_paired``) chooses the path, snapshots the BNs
and falls back from one-pass to re-run. ``bn_recal`` is a paired method without the dense side;
``none`` is its own (empty) pass (``run``). ``repair()`` validates the inputs, plans the BNs and
restores the model exactly when a method raises, so a method writes without bookkeeping. The
options dataclass is the single source of a method's option names and defaults; its
``__post_init__`` rejects bad values, so ``resolve`` fails before any model is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import check_seed
from .engine import PATHS, BNPlan, BNSite, PassResult, run_paired
from .moments import SHRINKAGE, Moments, dead_channels

# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that takes none."""


@dataclass(frozen=True)
class EngineOptions:
    """Options every paired method takes: they steer ``engine.run_paired``.

    path: "auto" (one-pass when the model traces with torch.fx, else re-run), "onepass" or
    "rerun". memory_limit_gb: the one-pass live-frontier limit in GiB before falling back to
    re-run; None = half the free CUDA memory, 8 GiB on CPU (``engine.memory_limit_bytes``).
    Raises ValueError for a path not in ``engine.PATHS``, a limit that is not a number > 0
    (a string, a bool, NaN, 0 or a negative limit; float("inf") never falls back), or a limit
    with path="rerun", which has no one-pass frontier to limit (it was ignored).
    """
    path: str = "auto"
    memory_limit_gb: float | None = None

    def __post_init__(self) -> None:
        _choice("path", self.path, PATHS)
        limit = self.memory_limit_gb
        if limit is not None and not (_is_number(limit) and limit > 0):
            raise ValueError(f"memory_limit_gb must be a number of GiB > 0 or None (None = the "
                             f"default limit), got {limit!r}")
        if limit is not None and self.path == "rerun":
            raise ValueError(f"memory_limit_gb={limit!r} limits the one-pass path, and path="
                             f"'rerun' never takes it; drop memory_limit_gb or use path 'auto'")


def _is_number(value: Any) -> bool:
    """A real number, not a bool and not NaN (a string such as "4" is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _choice(option: str, value: Any, valid) -> None:
    """Raise ValueError naming ``option`` unless ``value`` is one of the strings ``valid``
    (checked as a string first: an unhashable value is named, not a raw TypeError)."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {option} {value!r}; choose {', '.join(valid)}")


SCOPES = ("all", "branch_end", "inner")


@dataclass(frozen=True)
class ASROptions(EngineOptions):
    """shrinkage: the rule giving kappa, a key of ``moments.SHRINKAGE``. scope: the BNs whose gamma
    is damped: "all", "branch_end" (output feeds a residual sum) or "inner" (the others).
    Defaults chosen by the ablation in docs/RESULTS.md section 2 (scripts/repair_ablation.py
    shrinkage). Raises ValueError for an unknown shrinkage or scope."""
    shrinkage: str = "relative"
    scope: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("shrinkage", self.shrinkage, SHRINKAGE)
        _choice("scope", self.scope, SCOPES)


@dataclass(frozen=True)
class ClippedASROptions(ASROptions):
    """g_min, g_max: bounds on each channel's gain relative to the unrepaired model. Default
    chosen by the clip sweep in docs/RESULTS.md section 3 (scripts/repair_ablation.py clip).
    Raises ValueError unless 0 <= g_min <= g_max, g_min finite (g_max = float("inf"): no upper
    clip); g_min > g_max would silently set every gain to g_max."""
    g_min: float = 0.0
    g_max: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for option, value in (("g_min", self.g_min), ("g_max", self.g_max)):
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"{option} must be a number >= 0 (a bound on the channel "
                                 f"gain), got {value!r}")
        if self.g_min == float("inf"):
            raise ValueError("g_min must be finite, got inf; use g_min=0.0 for no lower clip")
        if self.g_min > self.g_max:
            raise ValueError(f"g_min={self.g_min!r} is above g_max={self.g_max!r}; pass "
                             "g_min <= g_max (g_max=float('inf') for no upper clip)")


def option_names(options_cls: type) -> list[str]:
    """Field names of an options dataclass, the most specific class's own fields first (so a
    message lists "shrinkage, scope" before the engine's "path, memory_limit_gb")."""
    names: list[str] = []
    valid = {f.name for f in dataclasses.fields(options_cls)}
    for klass in options_cls.__mro__:
        for name in vars(klass).get("__annotations__", {}):
            if name in valid and name not in names:
                names.append(name)
    return names


# ----------------------------------------------------------------------------- methods


class RepairMethod:
    """A registered repair method. Subclasses set the metadata and ``Options`` and implement
    ``run`` (or, for paired methods, ``update``: see ``PairedMethod``).

    Metadata (class attributes, checked by ``register``): ``name`` (registry key), ``family``
    (``list_repairs(family=...)``), ``needs_dense`` (``repair`` refuses dense=None),
    ``needs_bn`` (``repair`` refuses a model without BatchNorm), ``Options`` (a frozen
    dataclass; its fields are the method's only options and their defaults),
    ``min_values_per_channel`` (``repair`` refuses, before any write, a BN whose input has fewer
    values per channel over the calibration set).
    """
    name: ClassVar[str]
    family: ClassVar[str]
    needs_dense: ClassVar[bool]
    needs_bn: ClassVar[bool]
    Options: ClassVar[type] = NoOptions
    min_values_per_channel: ClassVar[int] = 1

    def resolve(self, **given: Any) -> Any:
        """The full options for one call: ``Options(**given)`` with every default filled in.
        Raises TypeError naming the valid options for an unknown name, ValueError (from
        ``Options.__post_init__``) for a bad value."""
        valid = option_names(self.Options)
        unknown = [k for k in given if k not in valid]
        if unknown:
            which = ", ".join(repr(k) for k in unknown)
            noun = "option" if len(unknown) == 1 else "options"
            takes = f"valid options: {', '.join(valid)}" if valid else "it takes no options"
            raise TypeError(f"{self.name} has no {noun} {which}; {takes}")
        return self.Options(**given)

    def run(self, opts: Any, pruned: nn.Module, dense: nn.Module | None,
            chunks: list[torch.Tensor], plan: BNPlan | None) -> PassResult:
        """Repair ``pruned`` in place (eval mode, no_grad, set by ``repair``). ``chunks``: image
        tensors [n, C, H, W] in the model's dtype and on its device. ``plan``: which BNs to
        change (``engine.plan_batchnorms``; None when ``needs_bn`` is False). ``repair``
        restores the model exactly if this raises or leaves a non-finite value."""
        raise NotImplementedError


class PairedMethod(RepairMethod):
    """A method driven by the paired engine: ``update`` is its whole rule. ``centred``: sum
    each chunk about its own mean (``moments.centred_chunk_moments``); the activation-statistic
    methods keep the dense running mean as the shift (fast, and their published numbers)."""
    needs_bn = True
    centred: ClassVar[bool] = False
    Options = EngineOptions

    def run(self, opts, pruned, dense, chunks, plan):
        return run_paired(pruned, dense if self.needs_dense else None, chunks,
                          lambda site, m: self.update(opts, site, m), opts.path,
                          opts.memory_limit_gb, plan, self.centred)

    def update(self, opts: Any, site: BNSite, m: Moments) -> dict:
        """Change ``site.bn`` in place from ``m`` (float64 moments of its input; dense ones only
        when ``needs_dense``); return the BN's record (``set_statistics`` builds it)."""
        raise NotImplementedError


REPAIRS: dict[str, RepairMethod] = {}


def register(cls: type[RepairMethod]) -> type[RepairMethod]:
    """Class decorator: check the metadata and add one instance to ``REPAIRS`` under
    ``cls.name``. Raises TypeError for missing metadata or a non-frozen Options dataclass,
    ValueError for a name already registered."""
    for attr, kind in (("name", str), ("family", str), ("needs_dense", bool),
                       ("needs_bn", bool)):
        if not isinstance(getattr(cls, attr, None), kind):
            raise TypeError(f"{cls.__name__}.{attr} must be a {kind.__name__}")
    opts = cls.Options
    if not (dataclasses.is_dataclass(opts) and opts.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass")
    if cls.name in REPAIRS:
        raise ValueError(f"repair method {cls.name!r} is already registered")
    REPAIRS[cls.name] = cls()
    return cls


def list_repairs(family: str | None = None) -> list[str]:
    """Registered method names in registration order, only those of ``family`` when given.
    Raises ValueError for a family no registered method has."""
    if family is None:
        return list(REPAIRS)
    families = {m.family for m in REPAIRS.values()}
    if family not in families:
        raise ValueError(f"unknown repair family {family!r}; choose one of "
                         f"{', '.join(sorted(families))}")
    return [n for n, m in REPAIRS.items() if m.family == family]


# ----------------------------------------------------------------------------- shared BN step


def set_statistics(site: BNSite, m: Moments, new_var: torch.Tensor, kappa: torch.Tensor,
                   gain: torch.Tensor, scale_gamma: bool = False) -> dict:
    """Write running_mean <- mu_s and running_var <- ``new_var`` (float64 [C], cast to the
    buffers' dtype); multiply gamma by ``kappa`` when ``scale_gamma`` and the BN is affine (a BN
    with affine=False has no gamma: its record says so in ``note``). Returns the BN's record:
    its name, dense/pruned means and standard deviations, rho (None where the moments have no
    dense side), kappa and the gain relative to the unrepaired BN.

    Raises FloatingPointError, before writing anything to this BN, when a value is non-finite
    or does not fit the BN's dtype (float16 holds at most 65504); ``repair`` then restores the
    model as it was before the call."""
    bn = site.bn
    mean = m.mean_s.to(bn.running_mean)
    var = new_var.to(bn.running_var)
    weight = None
    if scale_gamma and bn.affine:
        weight = bn.weight * kappa.to(bn.weight)
    for what, value in (("running_mean", mean), ("running_var", var), ("weight", weight)):
        if value is not None and not torch.isfinite(value).all():
            raise FloatingPointError(
                f"BatchNorm {site.name!r}: the repaired {what} is not finite in {value.dtype} "
                f"(largest |value| in float64 "
                f"{_largest(m.mean_s, new_var, kappa, what):.4g}); nothing of it was written")
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    if weight is not None:
        bn.weight.copy_(weight)
    record = {"name": site.name,
              "mu_d": m.mean_d, "sd_d": m.var_d.sqrt() if m.s2_d is not None else None,
              "mu_s": m.mean_s, "sd_s": m.var_s.sqrt(),
              "rho": m.rho if m.s_ds is not None else None,
              "kappa": kappa, "gain": gain}
    if scale_gamma and not bn.affine:
        record["note"] = "affine=False: no gamma, so kappa could not be applied"
    return record


def _largest(mean: torch.Tensor, var: torch.Tensor, kappa: torch.Tensor, what: str) -> float:
    value = {"running_mean": mean, "running_var": var}.get(what, kappa)
    return float(value.abs().max())


def _gain(kappa: torch.Tensor, v: torch.Tensor, new_var: torch.Tensor, eps: float):
    """Channel gain relative to the unrepaired BN: kappa sqrt((v + eps) / (new_var + eps))."""
    return kappa * torch.sqrt((v + eps) / (new_var + eps))


def _alive(kappa: torch.Tensor, m: Moments, v: torch.Tensor) -> torch.Tensor:
    """kappa with dead channels (``moments.dead_channels``) set to 0: their gain is 0."""
    return torch.where(dead_channels(m, v), torch.zeros_like(kappa), kappa)


# ----------------------------------------------------------------------------- the methods


@register
class NoRepair(RepairMethod):
    """Pruning only: the model is left as it is."""
    name = "none"
    family = "none"
    needs_dense = False
    needs_bn = False

    def run(self, opts, pruned, dense, chunks, plan):
        return PassResult("none", 0, 0, [])


@register
class BNRecal(PairedMethod):
    """BatchNorm recalibration (REFLOW's BN-only baseline): at each BN in forward order, with
    every earlier BN already recalibrated, running_mean <- the pooled mean and running_var <- the
    pooled unbiased variance (m2 / (n - 1), what a train-mode BN stores) of its input over all
    calibration images. Exact whatever the chunking: a train-mode pass with momentum None
    averages per-batch statistics, which weighs a 1-image tail chunk like a full one (7% off on
    the first BN of resnet20 with 257 images in chunks of 256, issue #18). Summed per chunk
    about the chunk's own mean (``centred``): a BN's old running mean may be far from the data.
    The record per BN adds its gain sqrt((v_old + eps) / (v_new + eps))."""
    name = "bn_recal"
    family = "bn"
    needs_dense = False
    centred = True
    min_values_per_channel = 2

    def update(self, opts, site, m):
        v = site.bn.running_var.double()
        new_var = m.m2_s / (m.n - 1)     # n >= 2 is checked by repair() before any write
        one = torch.ones_like(v)
        return set_statistics(site, m, new_var, one, _gain(one, v, new_var, site.bn.eps))


@register
class Layerwise(PairedMethod):
    """running_mean <- mu_s; g = sqrt(sum_c var_d / sum_c var_s); running_var <- v / g^2."""
    name = "layerwise"
    family = "activation_statistics"
    needs_dense = True

    def update(self, opts, site, m):
        v = site.bn.running_var.double()
        g = torch.sqrt(m.var_d.sum() / m.var_s.sum().clamp(min=1e-300))
        new_var = v / (g * g)
        kappa = _alive(torch.ones_like(v), m, v)
        return set_statistics(site, m, new_var, kappa, _gain(kappa, v, new_var, site.bn.eps))


@register
class Channelwise(PairedMethod):
    """running_mean <- mu_s, running_var <- var_s per channel (sequential recalibration)."""
    name = "channelwise"
    family = "activation_statistics"
    needs_dense = False

    def update(self, opts, site, m):
        v = site.bn.running_var.double()
        new_var = m.var_s
        kappa = _alive(torch.ones_like(v), m, v)
        return set_statistics(site, m, new_var, kappa, _gain(kappa, v, new_var, site.bn.eps))


@register
class ASR(PairedMethod):
    """channelwise, then gamma_c <- kappa_c gamma_c, kappa_c in [0, 1] from ``opts.shrinkage``
    at the BNs ``opts.scope`` selects (kappa = 1 elsewhere); beta unchanged."""
    name = "asr"
    family = "activation_statistics"
    needs_dense = True
    Options = ASROptions

    def kappa(self, opts: ASROptions, site: BNSite, m: Moments, v: torch.Tensor):
        """Float64 [C] kappa before dead channels are zeroed."""
        if opts.scope == "all" or (opts.scope == "branch_end") == site.branch_end:
            return SHRINKAGE[opts.shrinkage](m, v, site.bn.eps).clamp(0.0, 1.0)
        return torch.ones_like(v)

    def update(self, opts, site, m):
        v = site.bn.running_var.double()
        new_var = m.var_s
        kappa = _alive(self.kappa(opts, site, m, v), m, v)
        return set_statistics(site, m, new_var, kappa, _gain(kappa, v, new_var, site.bn.eps),
                              scale_gamma=True)


@register
class ClippedASR(ASR):
    """asr, then each live channel's gain relative to the unrepaired BN is clipped into
    [g_min, g_max] and gamma rescaled to realise it (dead channels keep gain 0)."""
    name = "clipped_asr"
    Options = ClippedASROptions

    def update(self, opts, site, m):
        v, eps = site.bn.running_var.double(), site.bn.eps
        new_var = m.var_s
        dead = dead_channels(m, v)
        kappa = _alive(self.kappa(opts, site, m, v), m, v)
        gain = _gain(kappa, v, new_var, eps)
        gain = torch.where(dead, gain, gain.clamp(opts.g_min, opts.g_max))
        kappa = gain * torch.sqrt((new_var + eps) / (v + eps))
        return set_statistics(site, m, new_var, kappa, gain, scale_gamma=True)


# ----------------------------------------------------------------------------- reconstruction
# The layer-wise rebuild is its own pass (reconstruct.py, on the math core lstsq.py); only its
# options and registration live here.
from .engine import plan_batchnorms  # noqa: E402
from .lstsq import PRIORS, TARGETS  # noqa: E402
from .reconstruct import reconstruct_  # noqa: E402

THEN = ("none", "bn_recal")


@dataclass(frozen=True)
class ReconstructOptions(EngineOptions):
    """Options of ``reconstruct`` (docs/repair.md, "Layer-wise reconstruction"; the rule and
    each option's meaning: ``reconstruct.reconstruct_`` and the ``lstsq`` module docstring).

    damping: lambda = damping * mean(diag H) per layer (and group), >= 0. max_positions:
    positions per layer summed into H, C (None: all), a seeded proportional subsample
    (``lstsq.Gram``). target: "dense" (reproduce W_d X_d) or "pruned" (W_d X_s). prior: "zero"
    (ridge towards 0, the issue's rule) or "dense" (towards the dense weights). then: "none" or
    "bn_recal" (BatchNorm recalibration after the refit, on the refit model). seed: draws the
    positions. path, memory_limit_gb: as for the paired methods (one-pass or per-layer re-run).
    Raises ValueError for a bad value.

    Defaults, from pretrained ResNet-20 on cifar10, ERK 0.9, 1,024 calibration images, top-1
    on the 2,000-image evaluation subset (docs/repair.md, "Layer-wise reconstruction"): every
    damping / prior / max_positions variant measured lands in 69.15-69.95 (a 2,000-image
    estimate has a standard error of about 1 pt), against asr 43.00 and bn_recal 39.55. damping
    1e-3: the best measured (69.95 vs 69.15 at 1e-2), and the zero prior's ridge shrinks even
    an unpruned layer less (conv1, left dense by ERK: relative output error 0.006 against 0.035
    at 1e-2). max_positions 4096: over 3 seeds at ERK 0.9 and LAMP 0.95, 16,384 and all
    positions gain 0.35-0.87 pt with paired intervals covering 0, at 2.6x and 20x the repair
    time, and 1,024 loses 3.2 pt under ERK (docs/repair.md, "Ablation");
    it keeps at least 7 positions per row of H on every ResNet-20/56 layer (K <= 576). then
    "none": recalibrating BatchNorm after the refit drops top-1 from 69.15 to 55.60.
    max_solve_gflop: a layer whose solve would cost more (``reconstruct.solve_gflop``: sum of
    k^3/3 over its output channels, k kept inputs) is left as pruned and its record says why;
    None: no limit. 4,000 GFLOP is minutes of float64 Cholesky on 2 CPU cores and seconds on a
    data-center GPU. Measured with ``solve_gflop`` on torchvision models (10 classes) pruned by
    ERK at 0.5: it refits every layer of the CIFAR ResNets (ResNet-56's largest is about 4
    GFLOP even unpruned), ResNet-18 (largest 766), ResNet-50 (577), DenseNet-121 and
    EfficientNet-B0; it skips VGG-11's 25,088-input classifier layer (1.8e6 GFLOP, days of
    CPU time), its 4,096-input one (4.0e4) and its 4,608-input convolutions (5,057 each)."""
    damping: float = 0.001
    max_positions: int | None = 4096
    target: str = "dense"
    prior: str = "zero"
    then: str = "none"
    seed: int = 0
    max_solve_gflop: float | None = 4000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (_is_number(self.damping) and 0 <= self.damping < float("inf")):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if self.max_positions is not None and (
                isinstance(self.max_positions, bool) or not isinstance(self.max_positions, int)
                or self.max_positions < 1):
            raise ValueError(f"max_positions must be a positive int or None, got "
                             f"{self.max_positions!r}")
        for option, value, valid in (("target", self.target, TARGETS),
                                     ("prior", self.prior, PRIORS), ("then", self.then, THEN)):
            _choice(option, value, valid)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        check_seed(self.seed)  # torch's range: its own overflow error named no option
        if self.max_solve_gflop is not None and not (
                _is_number(self.max_solve_gflop) and 0 < self.max_solve_gflop < float("inf")):
            raise ValueError(f"max_solve_gflop must be a finite number > 0 (GFLOP per layer) "
                             f"or None (no limit), got {self.max_solve_gflop!r}")


@register
class Reconstruct(RepairMethod):
    """Layer-wise reconstruction: every Conv2d / Linear, in forward order with its mask fixed,
    is refit by masked ridge least squares to reproduce the dense layer's output from the input
    it receives in the pruned model (``reconstruct.reconstruct_``); then, if ``then`` says so,
    BatchNorm recalibration (the registered ``bn_recal``). Works on models without BatchNorm.
    Report: one record per prunable layer, then bn_recal's per-BN records."""
    name = "reconstruct"
    family = "reconstruction"
    needs_dense = True
    needs_bn = False
    Options = ReconstructOptions

    def run(self, opts, pruned, dense, chunks, plan=None):
        bn_plan = None
        if opts.then == "bn_recal":       # planned before anything is written
            bn_plan = plan_batchnorms(pruned, chunks[0][:2])
            if not bn_plan.order:
                raise ValueError("reconstruct with then='bn_recal' needs a BatchNorm to "
                                 "recalibrate; the model has none that can be (use then='none')")
            recal = REPAIRS["bn_recal"]
            n = sum(int(c.shape[0]) for c in chunks)
            for bn in bn_plan.order:
                if n * bn_plan.values_per_image[bn] < recal.min_values_per_channel:
                    raise ValueError(f"bn_recal after reconstruct: BatchNorm {bn!r} sees "
                                     f"{n * bn_plan.values_per_image[bn]} value per channel; "
                                     f"it needs at least {recal.min_values_per_channel}")
        result = reconstruct_(pruned, dense, chunks, damping=float(opts.damping),
                              max_positions=opts.max_positions, target=opts.target,
                              prior=opts.prior, seed=opts.seed, path=opts.path,
                              memory_limit_gb=opts.memory_limit_gb,
                              max_solve_gflop=opts.max_solve_gflop)
        if bn_plan is None:
            return result
        recal = REPAIRS["bn_recal"]
        after = recal.run(recal.resolve(path=opts.path, memory_limit_gb=opts.memory_limit_gb),
                          pruned, None, chunks, bn_plan)
        return PassResult(result.path, result.passes_dense,
                          result.passes_pruned + after.passes_pruned, result.layers + after.layers)
