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

``plan_batchnorms`` decides, before anything is written, which BNs are repaired and which are
skipped (with the reason); ``ModelState`` snapshots and restores a model exactly, so that a
repair that fails part-way leaves no trace. ``run_paired`` is what a repair method calls: it
chooses the path (``auto``: one-pass when the models trace), snapshots the BatchNorm state, and
falls back to ``rerun`` from that snapshot when the one-pass frontier exceeds the memory limit. A
method only supplies the per-BN ``update``.

``walk_graph`` (node execution, freeing after last use, the memory frontier) and
``capture_input`` are shared with the layer-wise reconstruction (``reconstruct``), whose walks
differ only in which nodes run and what happens at the layer being refit.
"""

from __future__ import annotations

import enum
import operator
import types
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd

from .moments import Moments, centred_chunk_moments, chunk_moments, concat, merge, reshift

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


# ----------------------------------------------------------------------------- traced graphs
# A graph describes one instance at one time: a Python attribute read in forward (a flag, a
# depth, a list of layers to skip) changes the control flow that torch.fx records. Graphs are
# therefore cached under a key made of everything tracing can see that belongs to the model:
# per module its name, class, the class's forward, every plain attribute *by value*, and the
# names, shapes and dtypes of its parameters and buffers. A model with any attribute that is not
# a plain value (a tensor that is not a buffer, an arbitrary object, a closure) has no key and is
# traced on every call: if in doubt, trace again. What the key cannot see is module-level global
# state that forward reads; such a model must not change that state between repairs.
# Cost (2 busy CPU cores, best of 5-30): key 0.5 ms on resnet20 and 1.8 ms on resnet56, against
# 45 ms and 87 ms per trace; a pruned copy and its dense model share a key.

_GRAPH_CACHE_SIZE = 16
_GRAPHS: OrderedDict[tuple, torch.fx.GraphModule | None] = OrderedDict()
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module())) - {"training"}


class _NotPlain(Exception):
    pass


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                torch.layout, torch.memory_format, enum.Enum)


def _plain(value):
    """``value`` as a hashable key that compares by value; _NotPlain when that is not safe."""
    if isinstance(value, _PLAIN_TYPES):
        return (type(value), value)
    if isinstance(value, (type, types.BuiltinFunctionType)):
        return value
    if isinstance(value, types.FunctionType) and value.__closure__ is None:
        return value
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_plain(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(_plain(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((_plain(k), _plain(v)) for k, v in value.items()))
    raise _NotPlain


def _tensors_key(tensors: dict) -> tuple:
    return tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in tensors.items())


def graph_key(model: nn.Module) -> tuple | None:
    """The cache key of ``model``'s graph (see above), or None when it has none."""
    try:
        return tuple((name, type(m), type(m).forward,
                      tuple((k, _plain(v)) for k, v in vars(m).items()
                            if k not in _MODULE_BOOKKEEPING),
                      _tensors_key(m._parameters), _tensors_key(m._buffers))
                     for name, m in model.named_modules())
    except _NotPlain:
        return None


def traced(model: nn.Module) -> torch.fx.GraphModule | None:
    """``torch.fx.symbolic_trace(model)``, or None when the model does not trace. Cached under
    ``graph_key`` (least recently used of ``_GRAPH_CACHE_SIZE`` kept): tracing ResNet-50 costs
    ~40 ms, a sixth of its whole CUDA forward over 1,024 CIFAR images, and deep copies of one
    model (a pruned copy of each repair) share a key. The graph names modules, which are looked
    up on the model that runs it."""
    key = graph_key(model)
    if key is not None and key in _GRAPHS:
        _GRAPHS.move_to_end(key)
        return _GRAPHS[key]
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        gm = None
    if key is not None:
        _GRAPHS[key] = gm
        while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    return gm


def trace_graph(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph (``traced``), or None when it does not trace."""
    gm = traced(model)
    return None if gm is None else gm.graph


def same_graph(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """True when two traces compute the same thing node for node (equal generated code)."""
    return a is b or a.code == b.code


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
                   seen: dict, channels: dict, centred: bool = False) -> Moments:
    """Moments of a BN's input over all chunks. Channels that an earlier BN already summed
    (a DenseNet layer sees the concatenation of every earlier feature map of its block) are
    reused, re-shifted exactly, rather than summed again: that makes the statistics linear
    instead of quadratic in block depth. DenseNet-121, 256 images, 2 busy CPU cores
    (`python scripts/bench_repair_share.py`, run at this commit and its parent): moment sums
    6.3-6.7 s -> 2.4-2.7 s, ASR 1.54-1.58x -> 1.37-1.38x one dense + one pruned forward.
    ``centred``: sum each chunk about its own mean (``moments.centred_chunk_moments``)."""
    sums = centred_chunk_moments if centred else chunk_moments
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
            moments = merge(moments, sums(s, d, shift[off:off + c]))
        seen[node] = moments
        out.append(moments)
    result = out[0] if len(out) == 1 else concat(out)
    seen[src] = result
    return result


def _lookup(model: nn.Module, gm: torch.fx.GraphModule, target: str):
    """A get_attr target: the model's own attribute, else a constant the trace stored on the
    GraphModule (a tensor created inside forward becomes ``_tensor_constant<i>``)."""
    try:
        return _attr(model, target)
    except AttributeError:
        return _attr(gm, target)


# ----------------------------------------------------------------------------- graph walk
# The one node-by-node executor of both one-pass walks: the BatchNorm repairs (``run_onepass``
# below) and the layer-wise reconstruction (``reconstruct.run_onepass``). Each walk supplies
# which nodes must run and a hook at the nodes it changes (a BN before it normalises, a layer
# before it is refit); the execution, the freeing after last use and the memory frontier are
# here once.

Hook = Callable[[torch.fx.Node, dict, dict], None]


def execute_node(node: torch.fx.Node, env: dict, model: nn.Module, mods: dict[str, nn.Module],
                 gm: torch.fx.GraphModule, chunks: list[torch.Tensor]) -> list:
    """The values of fx ``node`` for ``model``, one per chunk. ``env``: node -> per-chunk
    values of every input node; ``mods``: ``model``'s named modules. A placeholder is the
    chunks themselves (the same objects for every model), a get_attr the model's attribute or
    the trace's constant (``_lookup``), and every call runs chunk by chunk."""
    k = len(chunks)
    if node.op == "placeholder":
        return chunks
    if node.op == "get_attr":
        return [_lookup(model, gm, node.target)] * k
    if node.op == "call_module":
        mod = mods[node.target]
        return [mod(*_map_chunk(node.args, env, j), **_map_chunk(node.kwargs, env, j))
                for j in range(k)]
    if node.op == "call_function":
        return [node.target(*_map_chunk(node.args, env, j), **_map_chunk(node.kwargs, env, j))
                for j in range(k)]
    if node.op == "call_method":
        out = []
        for j in range(k):
            self_, *rest = _map_chunk(node.args, env, j)
            out.append(getattr(self_, node.target)(*rest, **_map_chunk(node.kwargs, env, j)))
        return out
    raise RuntimeError(f"cannot execute fx node {node.name} of op {node.op!r}; please report")


def walk_graph(gm: torch.fx.GraphModule, pruned: nn.Module, dense: nn.Module | None,
               chunks: list[torch.Tensor], needed: Collection[torch.fx.Node], *,
               hooked: Collection[torch.fx.Node] = (), before: Hook | None = None,
               after: Callable[[torch.fx.Node, dict], None] | None = None,
               memory_limit_bytes: float = float("inf")) -> int:
    """Execute ``gm`` on P (and on D when given: the same graph, so the caller must have
    checked that D traces to it) over all chunks, node by node in graph order. Returns the peak
    live bytes of the node values (placeholders and attributes not counted).

    Only the nodes in ``needed`` run. At each node of ``hooked`` (needed or not),
    ``before(node, env_p, env_d)`` is called first: the values of its inputs in P and D
    (``env_*[input][chunk]``; ``env_d`` empty without D) are complete over all chunks and
    reflect every earlier change, and the hook may change P's module, which then runs with the
    change. ``after(node, env_p)`` is called once a needed node's values exist. A value is
    freed after its last use by a needed or hooked node. Raises FrontierTooLarge when the live
    bytes exceed ``memory_limit_bytes``; whatever a hook or the model raises propagates."""
    mods_p = dict(pruned.named_modules())
    mods_d = dict(dense.named_modules()) if dense is not None else {}
    nodes = list(gm.graph.nodes)
    hooked = set(hooked)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        if node in needed or node in hooked:
            for inp in node.all_input_nodes:
                last_use[inp] = i
    env_p: dict = {}
    env_d: dict = {}
    live = peak = 0
    for i, node in enumerate(nodes):
        if node in hooked and before is not None:
            before(node, env_p, env_d)
        if node in needed:
            for env, model, mods in ((env_p, pruned, mods_p), (env_d, dense, mods_d)):
                if model is None:
                    continue
                env[node] = execute_node(node, env, model, mods, gm, chunks)
                if node.op not in ("placeholder", "get_attr"):
                    live += _nbytes(env[node])
            if after is not None:
                after(node, env_p)
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


def run_onepass(pruned: nn.Module, dense: nn.Module | None, chunks: list[torch.Tensor],
                on_bn: OnBN | None, memory_limit_bytes: float = float("inf"),
                repair: Collection[str] | None = None, centred: bool = False,
                gm: torch.fx.GraphModule | None = None) -> int:
    """Execute P (and D when given) graph-wise over all chunks. Returns the peak live bytes.

    ``on_bn`` is called at the BNs named in ``repair`` (all BNs when None, and then a BN called
    twice raises RuntimeError); the others run unchanged. ``gm``: P's trace (``traced(pruned)``
    when None); D runs the same graph, so the caller must have checked that D traces to it.
    Raises RuntimeError when P does not trace, FrontierTooLarge past ``memory_limit_bytes``."""
    gm = gm if gm is not None else traced(pruned)
    if gm is None:
        raise RuntimeError("the model does not trace with torch.fx; use path='rerun'")
    mods_p = dict(pruned.named_modules())
    needed = _needed_nodes(gm.graph, mods_p)
    hooked = set() if on_bn is None else {
        n for n in needed if n.op == "call_module" and isinstance(mods_p[n.target], _BatchNorm)
        and (repair is None or n.target in repair)}
    seen_bn: set[str] = set()
    seen_moments: dict = {}      # node -> Moments of its value, under the shift they used
    channels: dict = {}          # node -> channel count of its value

    def at_bn(node: torch.fx.Node, env_p: dict, env_d: dict) -> None:
        mod = mods_p[node.target]
        if node.target in seen_bn:
            raise RuntimeError(f"BatchNorm {node.target} is called twice; the paired "
                               "repair needs each BN to see one input")
        seen_bn.add(node.target)
        on_bn(node.target, mod, _input_moments(
            node.args[0], mod.running_mean, env_p, env_d if dense is not None else None,
            seen_moments, channels, centred))

    def record_channels(node: torch.fx.Node, env_p: dict) -> None:
        first = env_p[node][0]
        if isinstance(first, torch.Tensor) and first.dim() >= 2:
            channels[node] = first.shape[1]

    return walk_graph(gm, pruned, dense, chunks, needed, hooked=hooked, before=at_bn,
                      after=record_channels, memory_limit_bytes=memory_limit_bytes)


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


def capture_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of module ``name`` when ``model`` runs on ``x``; the forward stops there (a
    temporary pre-hook, removed in ``finally`` whatever happens). The re-run paths of the BN
    repairs (``run_rerun``) and of the reconstruction (``reconstruct.run_rerun``) both use it.
    Raises RuntimeError when the forward never calls the module."""
    captured: list[torch.Tensor] = []

    def hook(mod, inp):
        captured.append(inp[0])
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward never called {name!r}; please report")
    return captured[0]


def run_rerun(pruned: nn.Module, dense: nn.Module | None, chunks: list[torch.Tensor],
              on_bn: OnBN, order: Iterable[str] | None = None, centred: bool = False) -> int:
    """Per-BN re-run path over the BNs in ``order`` (default: every BN, ``bn_forward_order``).
    Returns the number of (partial) passes of P."""
    order = list(order) if order is not None else bn_forward_order(pruned, chunks[0])
    sums = centred_chunk_moments if centred else chunk_moments
    mods_p = dict(pruned.named_modules())
    for name in order:
        moments = None
        for x in chunks:
            s = capture_input(pruned, name, x)
            d = capture_input(dense, name, x) if dense is not None else None
            moments = merge(moments, sums(s, d, mods_p[name].running_mean))
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
    return traced(model) is not None


# ----------------------------------------------------------------------------- model state

class ModelState:
    """The exact state of some modules, restorable: every parameter and buffer (the tensor
    objects, so that optimisers holding them stay valid, and a bit-exact copy of their values,
    None entries included), each module's training flag, each norm layer's momentum and each
    parameter's requires_grad. ``restore`` puts all of it back, undoing values written in place,
    tensors replaced or added, and modes or momenta changed; ``restore_modes`` only the flags
    and momenta. ``values=False`` copies no tensor (``restore`` is then ``restore_modes``). The
    copy is made on the tensors' own device: one extra model's memory for a repair's length."""

    def __init__(self, modules: Iterable[nn.Module], values: bool = True) -> None:
        self._entries = []
        self._flags = []
        seen: set[int] = set()
        for m in modules:
            if id(m) in seen:
                continue
            seen.add(id(m))
            params, buffers = dict(m._parameters), dict(m._buffers)
            grads = [(p, p.requires_grad) for p in params.values() if p is not None]
            momentum = m.momentum if isinstance(m, _NormBase) else None
            self._flags.append((m, grads, m.training, momentum))
            if values:
                copies = [(t, t.detach().clone()) for t in (*params.values(), *buffers.values())
                          if t is not None]
                self._entries.append((m, params, buffers, copies))

    @torch.no_grad()
    def restore(self) -> None:
        for m, params, buffers, copies in self._entries:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for t, saved in copies:
                t.copy_(saved)
        self.restore_modes()

    def restore_modes(self) -> None:
        for m, grads, training, momentum in self._flags:
            for p, flag in grads:
                p.requires_grad_(flag)
            m.training = training
            if isinstance(m, _NormBase):
                m.momentum = momentum


# ----------------------------------------------------------------------------- BN plan

@dataclass(frozen=True)
class BNPlan:
    """Which BatchNorms of a model a repair changes, decided before anything is written.

    ``calls``: every BN the forward calls, in the order of its first call. ``order``: the BNs to
    repair, in forward order. ``skipped``: name -> reason for every BN left unchanged (kept in
    the report's layers). ``counts``: calls per BN in one forward. ``values_per_image``: per
    called BN, how many values of each channel one image contributes to its input (H*W of a 2-d
    BN's input, 1 for a BatchNorm1d on [N, C]).
    """
    calls: tuple[str, ...]
    order: tuple[str, ...]
    skipped: dict[str, str]
    counts: dict[str, int]
    values_per_image: dict[str, int]

    def layers(self, records: dict[str, dict]) -> list[dict]:
        """The report's per-BN records: repaired and skipped BNs in forward order, then BNs the
        forward never calls. ``records``: name -> record of each repaired BN."""
        out = [records[n] if n in records else {"name": n, "skipped": self.skipped[n]}
               for n in self.calls]
        return out + [{"name": n, "skipped": r} for n, r in self.skipped.items()
                      if n not in self.calls]


# Reasons a BN is left unchanged (docs/repair.md, "What is supported and refused").
UNTRACKED = ("track_running_stats=False without running statistics: it normalises with the "
             "statistics of each batch, so there is nothing to recalibrate")
NOT_CALLED = "not called by the model's forward on the calibration images"
CALLED_TWICE = ("called {k} times in one forward: one set of running statistics serves {k} "
                "different inputs, so no single input's statistics can be written")

_CHANNEL_ATTR = ((_ConvNd, "in_channels"), (_NormBase, "num_features"),
                 (nn.GroupNorm, "num_channels"))


def _probe(model: nn.Module, probe: torch.Tensor, role: str):
    """One forward of ``model`` on ``probe`` (eval mode, no_grad, as the repair runs it): the
    BN call counts, first-call order and values per image, and a ValueError naming the module
    when the first layer that receives the images themselves expects another channel count."""
    counts: dict[str, int] = {}
    per_image: dict[str, int] = {}
    handles = []

    def count(mod, inp, name):
        counts[name] = counts.get(name, 0) + 1
        x = inp[0]
        per_image.setdefault(name, x.numel() // max(1, x.shape[0] * x.shape[1]))

    def check(mod, inp, name, expected):
        if inp and inp[0] is probe and probe.shape[1] != expected:
            raise ValueError(
                f"the calibration images have {probe.shape[1]} channel"
                f"{'s' * (probe.shape[1] != 1)} but the {role} model's "
                f"first layer {name!r} ({type(mod).__name__}) expects {expected}")

    try:
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm):
                handles.append(m.register_forward_pre_hook(
                    lambda mod, inp, name=name: count(mod, inp, name)))
            for kind, attr in _CHANNEL_ATTR:
                if isinstance(m, kind) and isinstance(getattr(m, attr, None), int):
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, inp, name=name, e=getattr(m, attr): check(mod, inp, name, e)))
                    break
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return counts, per_image


def check_image_channels(model: nn.Module, probe: torch.Tensor, role: str = "pruned") -> None:
    """Raise ValueError naming the module when the first layer that receives ``probe`` (a few
    calibration images [n, C, H, W] in the model's dtype and on its device) expects another
    channel count; one eval-mode no_grad forward, writes nothing."""
    _probe(model, probe, role)


def plan_batchnorms(model: nn.Module, probe: torch.Tensor, role: str = "pruned") -> BNPlan:
    """Decide, from one probe forward on ``probe`` (a few calibration images [n, C, H, W] in the
    model's dtype and on its device), which BatchNorms are repaired: a BN without running
    statistics (track_running_stats=False), one the forward does not call and one it calls more
    than once are skipped with the reason; every other BN (BatchNorm1d/2d/3d, SyncBatchNorm,
    affine or not) is repaired. Raises ValueError when the first layer that receives the images
    expects another channel count; whatever the forward raises otherwise propagates. Writes
    nothing (eval-mode forward; uninitialised lazy modules are refused by ``repair`` before)."""
    counts, per_image = _probe(model, probe, role)
    skipped: dict[str, str] = {}
    for name, bn in batchnorms(model).items():
        if bn.running_mean is None or bn.running_var is None:
            skipped[name] = UNTRACKED
        elif name not in counts:
            skipped[name] = NOT_CALLED
        elif counts[name] > 1:
            skipped[name] = CALLED_TWICE.format(k=counts[name])
    calls = tuple(counts)          # dict order: first call
    return BNPlan(calls, tuple(n for n in calls if n not in skipped), skipped, counts, per_image)


def check_dense_forward(pruned: nn.Module, dense: nn.Module, probe: torch.Tensor,
                        plan: BNPlan) -> None:
    """Refuse a dense model whose forward is not the pruned model's: when both trace, their
    graphs must be equal (an instance attribute read in forward, such as a flag, changes the
    graph); in any case the dense forward must call the same BatchNorms in the same order and
    as often. Raises ValueError naming dense."""
    gm_p, gm_d = traced(pruned), traced(dense)
    if gm_p is not None and gm_d is not None and not same_graph(gm_p, gm_d):
        raise ValueError("dense does not match pruned: their forwards trace to different "
                         "graphs (an attribute read in forward, e.g. a flag, differs); pass "
                         "the unpruned copy of the pruned model as dense")
    counts_d, _ = _probe(dense, probe, "dense")
    got, want = list(counts_d.items()), list(plan.counts.items())
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got),
                                                                               len(want)))
        show = (lambda calls: f"{calls[i][0]!r} ({calls[i][1]}x)" if i < len(calls) else "none")
        raise ValueError(f"dense does not match pruned: its forward calls BatchNorms in another "
                         f"order or number (call {i}: dense {show(got)}, pruned {show(want)}); "
                         "pass the unpruned copy of the pruned model as dense")


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
    """What one repair pass did: the path that ran ("onepass", "rerun", "none"), the (partial)
    passes of D and of P, and one record per BN (repaired or skipped) in forward order."""
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
               update: Update, path: str = "auto", memory_limit_gb: float | None = None,
               plan: BNPlan | None = None, centred: bool = False) -> PassResult:
    """Run ``update`` at every BN of ``plan.order`` in forward order, each BN seeing the moments
    of its input in P (after every upstream update) and, when ``dense`` is given, in D.

    ``chunks``: float image tensors [n, C, H, W] on the models' device, in their dtype.
    ``update`` changes the BN in place and returns its per-BN record (kept in the result's
    ``layers``, with a ``skipped`` record for each BN the plan skips). ``plan``: from
    ``plan_batchnorms`` (made here from the first chunk when None). ``centred``: sum each chunk
    about its own mean (``moments.centred_chunk_moments``), for BNs whose running mean may be far
    from the data. ``path``: "auto" takes "onepass" when P and D trace with torch.fx, else
    "rerun". On "onepass" the BN state is snapshot first; a live frontier over
    ``memory_limit_gb`` (``memory_limit_bytes``) restores it, drops the records and runs
    "rerun" instead, unless "onepass" was asked for explicitly, where ``FrontierTooLarge``
    propagates. Raises ValueError for a path not in ``PATHS``, RuntimeError for "onepass" on a
    model that does not trace.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose {', '.join(PATHS)}")
    if plan is None:
        plan = plan_batchnorms(pruned, chunks[0][:2])
    graph = _GraphFacts(pruned)
    records: dict[str, dict] = {}

    def on_bn(name: str, bn: _BatchNorm, m: Moments) -> None:
        records[name] = update(BNSite(name, bn, graph), m)

    limit = memory_limit_bytes(memory_limit_gb, chunks[0].device)
    gm = traced(pruned)
    if path == "onepass" and dense is not None and gm is not None and traced(dense) is None:
        raise RuntimeError("the dense model does not trace with torch.fx; use path='rerun'")
    chosen = path if path != "auto" else (
        "onepass" if gm is not None and (dense is None or traced(dense) is not None) else "rerun")
    repair = frozenset(plan.order)
    if chosen == "onepass":
        # Snapshot BN state so that a frontier over the memory limit can fall back to the
        # rerun path from a clean model (the limit is checked while the graph executes).
        saved = ModelState(batchnorms(pruned).values())
        try:
            run_onepass(pruned, dense, chunks, on_bn, limit, repair, centred, gm)
            passes = 1
        except FrontierTooLarge:
            if path == "onepass":
                raise
            saved.restore()
            records.clear()
            chosen = "rerun"
    if chosen == "rerun":
        passes = run_rerun(pruned, dense, chunks, on_bn, plan.order, centred)
    missing = [n for n in plan.order if n not in records]
    if missing:
        raise RuntimeError(f"the {chosen} pass never reached BatchNorm(s) {missing} that the "
                           "probe forward called; please report")
    return PassResult(chosen, passes if dense is not None else 0, passes, plan.layers(records))
