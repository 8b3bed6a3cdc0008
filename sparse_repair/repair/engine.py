"""Paired execution of a dense model D and its pruned copy P over a calibration set.

At every BatchNorm b (in forward order) the caller receives the pooled per-channel moments of
b's input in D and in P, where P's input already reflects every upstream repair, and may change
b before the data flows on. Two interchangeable paths:

* ``onepass``: trace both models with torch.fx and execute the graphs node by node over all
  calibration chunks; each BN's statistics are complete before the BN runs. One pass of D and
  one of P; activations are freed after their last use, so memory is the live frontier.
* ``rerun``: for each BN, run D and P from the input up to that BN (a temporary pre-hook stops
  the forward there) and accumulate its statistics. About one partial pass per BN; used when a
  model does not trace or the frontier would exceed ``memory_limit_bytes``.

Both accumulate identical chunks with the same float64 merge, so they agree to float rounding.

``run_paired`` is what a repair method calls: it chooses the path (``auto``: one-pass when the
model traces), snapshots the BatchNorm state, and falls back to ``rerun`` from that snapshot when
the one-pass frontier exceeds the memory limit. A method only supplies the per-BN ``update``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .stats import Moments, chunk_moments, concat, merge, reshift

OnBN = Callable[[str, _BatchNorm, Moments], None]

PATHS = ("auto", "onepass", "rerun")


class FrontierTooLarge(RuntimeError):
    pass


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm of ``model`` by qualified name, in module-registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _map_chunk(args, env: dict, j: int):
    return torch.fx.node.map_arg(args, lambda n: env[n][j])


def _needed_nodes(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> set:
    bn_nodes = [n for n in graph.nodes if n.op == "call_module"
                and isinstance(modules.get(n.target), _BatchNorm)]
    needed, stack = set(), list(bn_nodes)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed


def _nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


_GRAPHS: dict[tuple, torch.fx.Graph | None] = {}


def trace_graph(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph, or None when it does not trace. Cached per architecture (class and
    module names/types): tracing ResNet-50 costs ~40 ms, a sixth of its whole CUDA forward over
    1,024 CIFAR images, and the graph only names modules, which are looked up per model."""
    key = (type(model), tuple((n, type(m).__name__) for n, m in model.named_modules()))
    if key not in _GRAPHS:
        try:
            _GRAPHS[key] = torch.fx.symbolic_trace(model).graph
        except Exception:
            _GRAPHS[key] = None
    return _GRAPHS[key]


def _channel_cat_parts(node: torch.fx.Node) -> list | None:
    """The input nodes of a torch.cat along channels (dim 1), else None."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(parts, (list, tuple)) or \
            not all(isinstance(p, torch.fx.Node) for p in parts):
        return None
    return list(parts)


def _pieces(node: torch.fx.Node, seen: dict, channels: dict, offset: int = 0) -> list:
    """(node, channel offset, channels) pieces that make up ``node``'s value: a channel
    concatenation is split into its inputs, recursively, until a node whose moments are
    already known or that is not a concatenation."""
    parts = None if node in seen else _channel_cat_parts(node)
    if parts is None:
        return [(node, offset, channels[node])]
    out = []
    for part in parts:
        out += _pieces(part, seen, channels, offset)
        offset += channels[part]
    return out


def _input_moments(src: torch.fx.Node, shift: torch.Tensor, env_p: dict, env_d: dict | None,
                   seen: dict, channels: dict) -> Moments:
    """Moments of a BN's input over all chunks. Channels that an earlier BN already summed
    (a DenseNet layer sees the concatenation of every earlier feature map of its block) are
    reused, re-shifted exactly, rather than summed again: that makes the statistics linear
    instead of quadratic in block depth. DenseNet-121, 256 images, 2 busy CPU cores
    (`python scripts/bench_repair_share.py`, run at this commit and its parent): moment sums
    6.3-6.7 s -> 2.4-2.7 s, ASR 1.54-1.58x -> 1.37-1.38x one dense + one pruned forward."""
    pieces = _pieces(src, seen, channels)
    whole = len(pieces) == 1     # no slicing: the sums are exactly those of a plain BN input
    out = []
    for node, off, c in pieces:
        if node in seen:
            out.append(reshift(seen[node], shift[off:off + c]))
            continue
        moments = None
        for j in range(len(env_p[src])):
            s = env_p[src][j] if whole else env_p[src][j][:, off:off + c]
            d = None
            if env_d is not None:
                d = env_d[src][j] if whole else env_d[src][j][:, off:off + c]
            moments = merge(moments, chunk_moments(s, d, shift[off:off + c]))
        seen[node] = moments
        out.append(moments)
    result = out[0] if len(out) == 1 else concat(out)
    seen[src] = result
    return result


def run_onepass(pruned: nn.Module, dense: nn.Module | None, chunks: list[torch.Tensor],
                on_bn: OnBN | None, memory_limit_bytes: float = float("inf")) -> int:
    """Execute P (and D when given) graph-wise over all chunks. Returns the peak live bytes."""
    graph_p = trace_graph(pruned)
    if graph_p is None:
        raise RuntimeError("the model does not trace with torch.fx; use path='rerun'")
    mods_p = dict(pruned.named_modules())
    mods_d = dict(dense.named_modules()) if dense is not None else {}
    nodes = list(graph_p.nodes)
    needed = _needed_nodes(graph_p, mods_p)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        if node in needed:
            for inp in node.all_input_nodes:
                last_use[inp] = i
    seen_bn: set[str] = set()
    seen_moments: dict = {}      # node -> Moments of its value, under the shift they used
    channels: dict = {}          # node -> channel count of its value
    env_p: dict = {}
    env_d: dict = {}
    k = len(chunks)
    live = peak = 0
    for i, node in enumerate(nodes):
        if node not in needed:
            continue
        for env, model, mods in ((env_p, pruned, mods_p), (env_d, dense, mods_d)):
            if model is None:
                continue
            if node.op == "placeholder":
                env[node] = chunks
            elif node.op == "get_attr":
                env[node] = [_attr(model, node.target)] * k
            elif node.op == "call_module":
                mod = mods[node.target]
                if env is env_p and isinstance(mod, _BatchNorm):
                    if node.target in seen_bn:
                        raise RuntimeError(f"BatchNorm {node.target} is called twice; the paired "
                                           "repair needs each BN to see one input")
                    seen_bn.add(node.target)
                    if on_bn is not None:
                        on_bn(node.target, mod, _input_moments(
                            node.args[0], mod.running_mean, env_p,
                            env_d if dense is not None else None, seen_moments,
                            channels))
                env[node] = [mod(*_map_chunk(node.args, env, j), **_map_chunk(node.kwargs, env, j))
                             for j in range(k)]
            elif node.op == "call_function":
                env[node] = [node.target(*_map_chunk(node.args, env, j),
                                         **_map_chunk(node.kwargs, env, j)) for j in range(k)]
            elif node.op == "call_method":
                env[node] = []
                for j in range(k):
                    self_, *rest = _map_chunk(node.args, env, j)
                    env[node].append(getattr(self_, node.target)(
                        *rest, **_map_chunk(node.kwargs, env, j)))
            if node.op not in ("placeholder", "get_attr"):
                live += _nbytes(env[node])
        first = env_p[node][0]
        if isinstance(first, torch.Tensor) and first.dim() >= 2:
            channels[node] = first.shape[1]
        for inp in node.all_input_nodes:
            if last_use.get(inp) == i:
                for env in (env_p, env_d):
                    vals = env.pop(inp, None)
                    if vals is not None and inp.op not in ("placeholder", "get_attr"):
                        live -= _nbytes(vals)
        peak = max(peak, live)
        if peak > memory_limit_bytes:
            raise FrontierTooLarge(f"live activations reached {peak / 2**30:.2f} GiB")
    return peak


class _Stop(Exception):
    pass


def bn_forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """BatchNorm names in the order a forward pass calls them (one probe image)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def _capture_input(model: nn.Module, bn_name: str, x: torch.Tensor) -> torch.Tensor:
    captured = []

    def hook(mod, inp):
        captured.append(inp[0])
        raise _Stop

    handle = dict(model.named_modules())[bn_name].register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def run_rerun(pruned: nn.Module, dense: nn.Module | None, chunks: list[torch.Tensor],
              on_bn: OnBN) -> int:
    """Per-BN re-run path. Returns the number of (partial) passes of P."""
    order = bn_forward_order(pruned, chunks[0])
    mods_p = dict(pruned.named_modules())
    for name in order:
        moments = None
        for x in chunks:
            s = _capture_input(pruned, name, x)
            d = _capture_input(dense, name, x) if dense is not None else None
            moments = merge(moments, chunk_moments(s, d, mods_p[name].running_mean))
        on_bn(name, mods_p[name], moments)
    return len(order)


def branch_end_bns(model: nn.Module) -> set[str]:
    """BatchNorms whose output feeds a residual sum (the last BN of a residual branch or of a
    projection shortcut), found on the fx graph; empty when the model does not trace."""
    graph = trace_graph(model)
    if graph is None:
        return set()
    mods = dict(model.named_modules())
    adds = {operator.add, operator.iadd, torch.add}
    out = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), _BatchNorm):
            if any(u.op == "call_function" and u.target in adds for u in node.users) or \
                    any(u.op == "call_method" and u.target in ("add", "add_") for u in node.users):
                out.add(node.target)
    return out


def traces(model: nn.Module) -> bool:
    return trace_graph(model) is not None



# ----------------------------------------------------------------------------- paired driver

class _GraphFacts:
    """Facts about one model's fx graph, computed on first use: a method that never asks (every
    method but ASR with a scope other than "all") costs no graph walk and no trace attempt."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @cached_property
    def branch_ends(self) -> set[str]:
        return branch_end_bns(self.model)


@dataclass(frozen=True)
class BNSite:
    """One BatchNorm as a method's ``update`` sees it: its qualified name, the module (to be
    changed in place) and where it sits in the graph."""
    name: str
    bn: _BatchNorm
    _graph: _GraphFacts = field(repr=False)

    @property
    def branch_end(self) -> bool:
        """True when the BN's output feeds a residual sum (``branch_end_bns``); False for every
        BN of a model that does not trace."""
        return self.name in self._graph.branch_ends


Update = Callable[[BNSite, Moments], dict]


@dataclass
class PassResult:
    """What one repair pass did: the path that ran ("onepass", "rerun", "bn_train_pass",
    "none"), the (partial) passes of D and of P, and one record per BN in processing order."""
    path: str
    passes_dense: int
    passes_pruned: int
    layers: list[dict] = field(default_factory=list)


def memory_limit_bytes(limit_gb: float | None, device: torch.device) -> float:
    """The one-pass frontier limit: the option if given, else half the free memory of the
    CUDA device, else 8 GiB on CPU (a third of the 24 GiB machines this project runs on)."""
    if limit_gb is not None:
        return float(limit_gb) * 2**30
    if device.type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0]
    return 8.0 * 2**30


def run_paired(pruned: nn.Module, dense: nn.Module | None, chunks: list[torch.Tensor],
               update: Update, path: str = "auto",
               memory_limit_gb: float | None = None) -> PassResult:
    """Run ``update`` at every BN of ``pruned`` in forward order, each BN seeing the moments of
    its input in P (after every upstream update) and, when ``dense`` is given, in D.

    ``chunks``: float image tensors [n, C, H, W] on the models' device. ``update`` changes the
    BN in place and returns its per-BN record (kept in the result's ``layers``). ``path``: "auto"
    takes "onepass" when P traces with torch.fx, else "rerun". On "onepass" the BN state is
    snapshot first; a live frontier over ``memory_limit_gb`` (``memory_limit_bytes``) restores
    it, drops the records and runs "rerun" instead, unless "onepass" was asked for explicitly,
    where ``FrontierTooLarge`` propagates. Raises ValueError for a path not in ``PATHS``.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose {', '.join(PATHS)}")
    graph = _GraphFacts(pruned)
    layers: list[dict] = []

    def on_bn(name: str, bn: _BatchNorm, m: Moments) -> None:
        layers.append(update(BNSite(name, bn, graph), m))

    limit = memory_limit_bytes(memory_limit_gb, chunks[0].device)
    chosen = path if path != "auto" else ("onepass" if traces(pruned) else "rerun")
    if chosen == "onepass":
        # Snapshot BN state so that a frontier over the memory limit can fall back to the
        # rerun path from a clean model (the limit is checked while the graph executes).
        saved = {n: copy.deepcopy(b.state_dict()) for n, b in batchnorms(pruned).items()}
        try:
            run_onepass(pruned, dense, chunks, on_bn, limit)
            passes = 1
        except FrontierTooLarge:
            if path == "onepass":
                raise
            for n, b in batchnorms(pruned).items():
                b.load_state_dict(saved[n])
            layers.clear()
            chosen = "rerun"
    if chosen == "rerun":
        passes = run_rerun(pruned, dense, chunks, on_bn)
    return PassResult(chosen, passes if dense is not None else 0, passes, layers)
