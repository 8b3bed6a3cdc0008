"""Layer-wise reconstruction repair (``reconstruct``, issue #17): the walk over a pruned model P
and its dense model D that feeds the least-squares core ``lstsq`` layer by layer.

Rule. Every prunable layer (``nn.Conv2d`` with any ``groups``, depthwise included, and
``nn.Linear``) is refit in forward order, with its mask fixed, so that it reproduces the dense
layer's output from the input it actually receives in P::

    w_o[S_o] = (H[S_o, S_o] + lambda I)^-1 (C w_o)[S_o],   lambda = damping * mean(diag H)
    H = X_s X_s^T,  C = X_s X_d^T

per output channel o (``lstsq`` module docstring: notation, the ``prior`` and ``target``
variants, the bias as an always-kept weight on a constant row). ``X_d`` is the layer's input in
D, ``X_s`` its input in P after every earlier layer was refit, on the same calibration images;
pruned entries stay exactly 0. The mask ``S`` is the pruned layer's zero pattern when the layer
is reached: after ``prune_`` exactly its pruned weights, and a weight that was already exactly
0 in the dense model is treated as pruned too (it stays 0). The dense weights ``w_o`` are read
from D, so the result does not depend on what P's kept weights held before.

Sources: Lazarevich et al., "Post-training deep neural network pruning via layer-wise
calibration", ICCV workshops 2021 (sequential layer-wise calibration on P's own inputs); Frantar
and Alistarh, "Optimal Brain Compression", NeurIPS 2022, and "SparseGPT", ICML 2023 (the
masked least-squares update with a dampened Hessian ``H + lambda I``).

Two interchangeable paths, as for the BatchNorm repairs (``engine``):

* ``onepass``: trace P with torch.fx (``engine.traced``: a graph is cached under a key of
  everything tracing sees of the instance, so it is never reused for another instance, issue
  #18) and execute its graph node by node over all calibration chunks, for P and (target
  "dense") D, with the BatchNorm repairs' executor ``engine.walk_graph``; at each prunable
  layer the sums of all chunks are complete before the layer runs, the layer is refit, and P's
  pass continues with the new weights. Activations are freed after their last use; only nodes
  that feed some refit layer run. One pass of D and one of P.
* ``rerun``: for each layer, run D and P from the input up to that layer (a temporary forward
  pre-hook captures the layer's input and stops the forward, ``engine.capture_input``; it is
  removed in ``finally``, so no hook is left on either model) and accumulate chunk by chunk.
  About one partial pass of each model per layer; used when a model does not trace or the
  one-pass live frontier would exceed the memory limit (the weights written so far are then
  put back first).

Both feed identical chunks, in the same order, to a ``Gram`` seeded per layer, so they draw the
same positions and agree to float rounding (tested to 1e-5 relative).

Layers left unchanged, with the reason in the report: a layer the forward never calls, one it
calls more than once (one weight, several inputs), one whose weight is shared with another
module, one whose weight is not a plain ``nn.Parameter`` (torch.nn.utils.parametrize, hook-based
weight or spectral norm; a torch.nn.utils.prune mask is supported: ``weight_orig`` is refit on
the mask's kept entries), and a Conv2d with a ``padding_mode`` other than "zeros".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from ..runtime import user_stacklevel
from . import engine
from .engine import FrontierTooLarge, PassResult, capture_input
from .lstsq import PRIORS, TARGETS, Gram, solve

__all__ = ["PRUNABLE", "LayerPlan", "plan_layers", "reconstruct_"]

PRUNABLE = (nn.Conv2d, nn.Linear)

# Reasons a prunable layer is left unchanged (kept in the report's layers).
NOT_CALLED = "not called by the model's forward on the calibration images"
CALLED_TWICE = ("called {k} times in one forward: one weight serves {k} different inputs, so "
                "no single input's least-squares problem can be solved")
SHARED = ("its weight is shared with {others}: refitting it for one call site would change "
          "the other")
PADDING = ("padding_mode={mode!r}: the least-squares rebuild unfolds zero-padded patches only "
           "(lstsq.unfold_inputs)")
COMPUTED = ("its {what} is not a plain nn.Parameter ({kind}): it is recomputed at every access "
            "or forward, so refit values written into it would not stay")
TOO_LARGE = ("its least-squares solve would cost about {gflop:,.0f} GFLOP ({o} output channels "
             "with up to {k} kept inputs each; sum of k^3/3), above max_solve_gflop="
             "{limit:,.0f}: it is left as pruned; pass a larger max_solve_gflop (or None) to "
             "refit it")


def solve_gflop(module: nn.Module) -> tuple[float, int]:
    """Estimated float64 work of refitting ``module`` (``nn.Conv2d`` / ``nn.Linear``) with its
    current mask: ``sum_o k_o^3 / 3`` GFLOP for the Cholesky factorisations (``k_o``: kept
    weights of output channel o, plus its bias), the term that grows fastest; and the largest
    ``k_o``. The Gram products (``2 K^2 P``) and the memory of H and C (``16 K^2`` bytes per
    group) are smaller wherever the solve fits the budget."""
    w = _effective_weight(module).detach()
    kept = (w.reshape(w.shape[0], -1) != 0).sum(dim=1).to(torch.float64)
    kept = kept + (module.bias is not None)
    return float((kept ** 3).sum() / 3e9), int(kept.max()) if kept.numel() else 0


@dataclass(frozen=True)
class LayerPlan:
    """Which prunable layers a reconstruction refits, decided from one probe forward before
    anything is written. ``calls``: every Conv2d / Linear the forward calls, in first-call
    order. ``order``: those refit, in forward order. ``skipped``: name -> reason for every
    prunable layer left unchanged (never-called layers included)."""
    calls: tuple[str, ...]
    order: tuple[str, ...]
    skipped: dict[str, str]

    def layers(self, records: dict[str, dict]) -> list[dict]:
        """The report's per-layer records in forward order, then layers never called."""
        out = [records[n] if n in records else {"name": n, "skipped": self.skipped[n]}
               for n in self.calls]
        return out + [{"name": n, "skipped": r} for n, r in self.skipped.items()
                      if n not in self.calls]


def _prune_hook(module: nn.Module) -> bool:
    """True when ``module.weight`` is torch.nn.utils.prune's ``weight_orig * weight_mask``."""
    return any(isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == "weight"
               for h in module._forward_pre_hooks.values())


def _problem(module: nn.Module) -> str | None:
    """Why refit values could not be written into ``module`` (None: they can)."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return PADDING.format(mode=module.padding_mode)
    for what in ("weight", "bias"):
        if parametrize.is_parametrized(module, what):
            return COMPUTED.format(what=what, kind="torch.nn.utils.parametrize")
        if what == "weight" and _prune_hook(module):
            if not isinstance(module._parameters.get("weight_orig"), nn.Parameter):
                return COMPUTED.format(what=what, kind="prune mask without weight_orig")
            continue
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "name", None) == what or getattr(hook, "_tensor_name", None) == what:
                return COMPUTED.format(what=what, kind=type(hook).__name__)
        param = module._parameters.get(what)
        if what == "bias" and param is None and "bias" not in module._parameters:
            continue
        if param is not None and not isinstance(param, nn.Parameter):
            return COMPUTED.format(what=what, kind=type(param).__name__)
        if what == "weight" and param is None:
            return COMPUTED.format(what=what, kind=type(getattr(module, what, None)).__name__)
    return None


def _weight_tensor(module: nn.Module) -> Tensor:
    """The tensor refit values are written into: ``weight``, or ``weight_orig`` under a prune
    mask."""
    return module.weight_orig if _prune_hook(module) else module.weight


def _effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with (``weight_orig * weight_mask`` under a prune mask)."""
    if _prune_hook(module):
        return module.weight_orig * module.weight_mask
    return module.weight


def plan_layers(model: nn.Module, probe: Tensor, max_solve_gflop: float | None = None
                ) -> LayerPlan:
    """Decide which prunable layers of ``model`` are refit, from one eval-mode forward of
    ``probe`` (a few calibration images, [n, C, H, W], in the model's dtype and on its device)
    with temporary pre-hooks that count each Conv2d / Linear call (removed in ``finally``).

    A layer whose solve would cost more than ``max_solve_gflop`` (``solve_gflop``; None: no
    limit) is skipped with the estimate as its reason, and a UserWarning names it.

    Raises ValueError when the model has no ``nn.Conv2d`` / ``nn.Linear`` at all, or none that
    can be refit (the message lists every layer's reason). Whatever the forward raises
    propagates. Writes nothing."""
    prunable = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    if not prunable:
        raise ValueError("reconstruct refits nn.Conv2d and nn.Linear layers, and the model has "
                         "none; use a model with convolutional or linear layers")
    counts: dict[str, int] = {}
    handles = []

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    try:
        for name, m in prunable.items():
            handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: count(name)))
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    # a weight tensor reachable from two modules (named_modules lists a module once, so two
    # names of one module are one entry here; two modules sharing one Parameter are two)
    owners: dict[int, list[str]] = {}
    for name, m in prunable.items():
        w = m._parameters.get("weight_orig" if _prune_hook(m) else "weight")
        if isinstance(w, Tensor):
            owners.setdefault(id(w), []).append(name)
    skipped: dict[str, str] = {}
    for name, m in prunable.items():
        w = m._parameters.get("weight_orig" if _prune_hook(m) else "weight")
        others = [o for o in owners.get(id(w), []) if o != name]
        if name not in counts:
            skipped[name] = NOT_CALLED
        elif counts[name] > 1:
            skipped[name] = CALLED_TWICE.format(k=counts[name])
        elif others:
            skipped[name] = SHARED.format(others=", ".join(repr(o) for o in others))
        elif (problem := _problem(m)) is not None:
            skipped[name] = problem
        elif max_solve_gflop is not None:
            gflop, k = solve_gflop(m)
            if gflop > max_solve_gflop:
                skipped[name] = TOO_LARGE.format(gflop=gflop, o=m.weight.shape[0], k=k,
                                                 limit=max_solve_gflop)
    budget = [n for n, r in skipped.items() if r.startswith("its least-squares solve")]
    if budget:
        warnings.warn(f"reconstruct leaves {len(budget)} layer(s) as pruned because their "
                      f"solve exceeds max_solve_gflop={max_solve_gflop:,.0f}: "
                      f"{', '.join(budget)} (the report's per-layer records say why)",
                      UserWarning, stacklevel=user_stacklevel())
    calls = tuple(counts)          # dict order: first call
    order = tuple(n for n in calls if n not in skipped)
    if not order:
        raise ValueError("reconstruct: no prunable layer of the model can be refit: "
                         + "; ".join(f"{n}: {r}" for n, r in skipped.items()))
    return LayerPlan(calls, order, skipped)


# ----------------------------------------------------------------------------- one layer

def cond_estimate(H: Tensor, iters: int = 12) -> float:  # noqa: N803 - the issue's notation
    """Estimated condition number ``lambda_max / lambda_min`` of the symmetric PSD ``H``
    ([groups, K, K], float64), largest over groups; inf when H is singular (its Cholesky
    factorisation fails, as for a layer whose input is all zero).

    ``lambda_max`` by ``iters`` power iterations, ``1 / lambda_min`` by as many inverse
    iterations through one Cholesky factor, from a seeded start vector (deterministic); both
    Rayleigh-type estimates err low, so the result is a lower bound. Why not ``eigvalsh`` (what
    ``lstsq.solve(cond=True)`` reports): on ResNet-20 at 1,024 images (ERK 0.9, 8,192
    positions, 2 busy cores) its 20 eigendecompositions took 21 s of an 84 s repair, 1.5x the
    dense + pruned forward itself (cProfile), while this estimate costs one Cholesky (0.02 s
    at K = 576) plus 2 * iters matrix-vector products, and came within 3-8% of the exact value
    on synthetic Gram matrices with condition numbers 1.7e3 to 5e11 (the test checks 20%)."""
    g, k, _ = H.shape
    chol, info = torch.linalg.cholesky_ex(H)
    gen = torch.Generator().manual_seed(0)
    v = (torch.rand(g, k, 1, generator=gen, dtype=H.dtype) + 0.5).to(H.device)
    u = v.clone()
    for i in range(iters):
        v = H @ v
        u = torch.cholesky_solve(u, chol)
        # renormalise every 4 steps (no overflow: |v| grows by at most cond^4 in between)
        # and just before the last step, whose growth is then the eigenvalue estimate
        if i + 1 < iters and ((i + 1) % 4 == 0 or i + 2 == iters):
            v = v / v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(H.dtype).tiny)
            u = u / u.norm(dim=1, keepdim=True).clamp(min=torch.finfo(H.dtype).tiny)
    ratio = (v.norm(dim=1) * u.norm(dim=1)).flatten()
    ratio = torch.where((info == 0) & torch.isfinite(ratio), ratio,
                        torch.full_like(ratio, float("inf")))
    return float(ratio.max())


Pairs = Iterable[tuple[Tensor, Tensor | None]]


class _Refit:
    """Refits one layer at a time from its paired inputs and keeps the per-layer records and the
    values it overwrote (so a one-pass attempt that hits the memory limit can be undone)."""

    def __init__(self, pruned: nn.Module, dense: nn.Module, n_samples: int, *, damping: float,
                 max_positions: int | None, target: str, prior: str, seed: int) -> None:
        self.mods_p = dict(pruned.named_modules())
        self.mods_d = dict(dense.named_modules())
        self.n_samples = n_samples
        self.damping, self.max_positions = damping, max_positions
        self.target, self.prior, self.seed = target, prior, seed
        self.records: dict[str, dict] = {}
        self.saved: list[tuple[Tensor, Tensor]] = []
        self.index = 0

    def __call__(self, name: str, pairs: Pairs) -> None:
        layer, layer_d = self.mods_p[name], self.mods_d[name]
        # One generator per layer, seeded from (seed, position in the order): both paths refit
        # the same layers in the same order, so they draw the same positions.
        w_d = layer_d.weight.detach()
        b_d = None if layer_d.bias is None else layer_d.bias.detach()
        # with the dense weights, Gram sums ||W_d X_d||^2 instead of D = X_d X_d^T (the error
        # report's only use of D): one K x K product per chunk fewer (lstsq module docstring)
        gram = Gram(layer, target=self.target, max_positions=self.max_positions,
                    n_samples=self.n_samples, seed=self.seed * 1_000_003 + self.index,
                    dense_weight=w_d, dense_bias=b_d)
        self.index += 1
        for x_s, x_d in pairs:
            gram.add(x_s, x_d)
        mask = _effective_weight(layer).detach() != 0
        w, b, info = solve(w_d, mask, gram.H, gram.C, None if gram.energy is not None else gram.D,
                           damping=self.damping, bias=b_d, prior=self.prior, cond=False,
                           energy=gram.energy)
        target_w = _weight_tensor(layer)
        self.saved.append((target_w, target_w.detach().clone()))
        # under a prune mask only the kept entries of weight_orig change; the mask zeroes the rest
        target_w.copy_(torch.where(mask, w, target_w) if _prune_hook(layer) else w)
        if b is not None:
            self.saved.append((layer.bias, layer.bias.detach().clone()))
            layer.bias.copy_(b)
        self.records[name] = {
            "name": name, "kind": type(layer).__name__,
            "rel_err_before": info.rel_err_before, "rel_err_after": info.rel_err_after,
            "cond_h": cond_estimate(gram.H), "kept": info.kept, "fallback": len(info.fallback),
            "positions": gram.n}

    def undo(self) -> None:
        for t, old in reversed(self.saved):
            t.copy_(old)
        self.saved.clear()
        self.records.clear()
        self.index = 0


# ----------------------------------------------------------------------------- one-pass path

def run_onepass(pruned: nn.Module, dense: nn.Module | None, chunks: list[Tensor],
                refit: Callable[[str, Pairs], None], order: Iterable[str],
                gm: torch.fx.GraphModule, memory_limit_bytes: float = float("inf")) -> int:
    """Execute P's graph ``gm`` (and, when ``dense`` is given, the same graph on D) over all
    chunks, calling ``refit(name, pairs)`` at each layer of ``order`` before P runs it; pairs are
    (P's input, D's input or None) per chunk. Returns the peak live bytes. The execution is
    ``engine.walk_graph``, the BatchNorm repairs' walk; this supplies the nodes and the hook.

    The caller must have checked that D traces to ``gm``. Raises RuntimeError when a layer of
    ``order`` is called twice or never reached, FrontierTooLarge past ``memory_limit_bytes``."""
    todo = set(order)
    k = len(chunks)
    fit_nodes = {n for n in gm.graph.nodes if n.op == "call_module" and n.target in todo}
    # only what some refit layer depends on runs: the head after the last layer does not
    needed, stack = set(), [i for n in fit_nodes for i in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    done: set[str] = set()

    def at_layer(node: torch.fx.Node, env_p: dict, env_d: dict) -> None:
        if node.target in done:
            raise RuntimeError(f"layer {node.target} is called twice; the layer-wise "
                               "reconstruction needs each layer to see one input")
        done.add(node.target)
        src = node.args[0] if node.args else next(iter(node.kwargs.values()))
        refit(node.target, zip(env_p[src], env_d[src] if dense is not None else [None] * k))

    peak = engine.walk_graph(gm, pruned, dense, chunks, needed, hooked=fit_nodes,
                             before=at_layer, memory_limit_bytes=memory_limit_bytes)
    missing = [n for n in order if n not in done]
    if missing:
        raise RuntimeError(f"the one-pass walk never reached layer(s) {missing} that the probe "
                           "forward called; please report")
    return peak


# ----------------------------------------------------------------------------- re-run path

def run_rerun(pruned: nn.Module, dense: nn.Module | None, chunks: list[Tensor],
              refit: Callable[[str, Pairs], None], order: Iterable[str]) -> int:
    """Per-layer re-run path: for each layer of ``order``, P and (when given) D run up to it on
    every chunk, one chunk at a time, and ``refit`` consumes the captured inputs. Returns the
    number of (partial) passes of P."""
    order = list(order)
    for name in order:
        refit(name, ((capture_input(pruned, name, x),
                      capture_input(dense, name, x) if dense is not None else None)
                     for x in chunks))
    return len(order)


# ----------------------------------------------------------------------------- driver

def reconstruct_(pruned: nn.Module, dense: nn.Module, chunks: list[Tensor], *,
                 damping: float, max_positions: int | None, target: str = "dense",
                 prior: str = "zero", seed: int = 0, path: str = "auto",
                 memory_limit_gb: float | None = None,
                 max_solve_gflop: float | None = None) -> PassResult:
    """Refit every prunable layer of ``pruned`` in place (module docstring for the rule).

    Args:
        pruned, dense: P and D, in eval mode, on one device, with the same parameter names,
            shapes and dtypes (``repair`` checks that); D is never changed.
        chunks: calibration images, ``[n, C, H, W]`` tensors in the models' dtype and on their
            device (float16 / bfloat16 models keep their dtype: inputs are summed in float64 and
            the refit weights cast back, ``lstsq``).
        damping, prior, target: of ``lstsq.solve`` / ``lstsq.Gram``. target "pruned"
            reproduces ``W_d X_s`` and never runs D (it still reads D's weights).
        max_positions: positions (output pixels x images) per layer summed into H, drawn by a
            generator seeded with ``seed * 1_000_003 + i`` for the i-th refit layer; None: all.
        path: "auto" (one-pass when P traces and, for target "dense", D traces to the same
            graph), "onepass" or "rerun". memory_limit_gb: the one-pass frontier limit
            (``engine.memory_limit_bytes``); past it "auto" restores the weights and re-runs.
        max_solve_gflop: layers whose solve would cost more are left as pruned, with the reason
            in their record (``plan_layers``); None: every layer is refit.

    Returns:
        ``PassResult`` (path, passes of D and of P, one record per prunable layer in forward
        order: name, kind, rel_err_before / rel_err_after (in-sample relative output error of
        the masked dense weights and of the refit ones, ``lstsq.SolveInfo``), cond_h (condition
        of the undamped H), kept, fallback (channels solved by pseudo-inverse), positions; or
        ``{"name", "skipped": reason}``).

    Raises:
        ValueError: no prunable layer, or none that can be refit (``plan_layers``); a bad
            target / prior / path; D tracing to another graph than P; non-finite layer inputs
            or a refit weight that overflows the layer's dtype (from ``lstsq``).
        RuntimeError: path "onepass" on a model that does not trace.
        FrontierTooLarge: path "onepass" past the memory limit.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if path not in engine.PATHS:
        raise ValueError(f"unknown path {path!r}; choose {', '.join(engine.PATHS)}")
    plan = plan_layers(pruned, chunks[0][:2], max_solve_gflop)
    run_dense = dense if target == "dense" else None
    n = sum(int(c.shape[0]) for c in chunks)
    refit = _Refit(pruned, dense, n, damping=damping, max_positions=max_positions,
                   target=target, prior=prior, seed=seed)
    chosen = path
    gm = engine.traced(pruned) if path != "rerun" else None
    if path != "rerun":
        gm_d = engine.traced(run_dense) if run_dense is not None else gm
        if gm is not None and gm_d is not None and not engine.same_graph(gm, gm_d):
            raise ValueError("dense does not match pruned: their forwards trace to different "
                             "graphs (an attribute read in forward, e.g. a flag, differs); pass "
                             "the unpruned copy of the pruned model as dense")
        if path == "onepass" and (gm is None or gm_d is None):
            which = "model" if gm is None else "dense model"
            raise RuntimeError(f"the {which} does not trace with torch.fx; use path='rerun'")
        chosen = "onepass" if gm is not None and gm_d is not None else "rerun"
    if chosen == "onepass":
        limit = engine.memory_limit_bytes(memory_limit_gb, chunks[0].device)
        try:
            run_onepass(pruned, run_dense, chunks, refit, plan.order, gm, limit)
            passes = 1
        except FrontierTooLarge:
            if path == "onepass":
                raise
            refit.undo()
            chosen = "rerun"
    if chosen == "rerun":
        passes = run_rerun(pruned, run_dense, chunks, refit, plan.order)
    return PassResult(chosen, passes if run_dense is not None else 0, passes,
                      plan.layers(refit.records))
