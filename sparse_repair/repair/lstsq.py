"""Layer-wise least-squares reconstruction of the kept weights (``reconstruct``, issue #17):
the pure math core. No hooks, no model walking: the caller feeds paired layer inputs.

Notation. For one prunable layer (``nn.Conv2d`` with any ``groups``, or ``nn.Linear``) with its
mask fixed, on the same calibration images:

* ``X_d``: the layer's input in the dense model, ``X_s``: its input in the pruned model (after
  every earlier layer was reconstructed), unfolded into patch columns, one column per output
  position: ``[K, P]`` per group, ``K = C_in/groups * kh * kw`` (+1 constant row of ones when
  the layer has a bias, so the bias is refit as one more always-kept weight), ``P`` positions.
* ``H = X_s X_s^T``, ``C = X_s X_d^T``, ``D = X_d X_d^T`` (float64, ``[groups, K, K]``).
* For output channel ``o`` with dense weights ``w_o`` (bias appended) and kept index set
  ``S_o`` (the constant row is always in ``S_o``)::

      w_o[S_o] = (H[S_o, S_o] + lambda I)^-1 (C w_o)[S_o],   lambda = damping * mean(diag H)

  and every other entry stays exactly 0. At ``damping = 0`` this minimises
  ``||w_o^T X_d - w^T X_s||^2`` over weights ``w`` on the mask (the normal equations of that
  problem restricted to ``S_o``).
* ``target="pruned"`` refits to reproduce the dense weights' output on the pruned inputs,
  ``w_o^T X_s``: then ``C = H`` (and ``D = H`` for the error report).

Sources: layer-wise calibration of pruned networks (Lazarevich et al., "Post-training deep
neural network pruning via layer-wise calibration", ICCV workshops 2021); the masked
least-squares weight update with a dampened Hessian ``H + lambda I``, ``lambda`` a fraction of
``mean(diag H)`` (Optimal Brain Compression, Frantar and Alistarh, NeurIPS 2022; SparseGPT,
Frantar and Alistarh, ICML 2023). Unlike SparseGPT, which shares one Hessian factorisation
across rows by pruning columns in a fixed order, each channel here has its own fixed mask, so
each channel's kept block is solved exactly.

Damping prior. The issue's rule (``prior="zero"``) is ridge regression: it shrinks the kept
weights towards 0, so with ``damping > 0`` even an unpruned layer with ``X_s == X_d`` does not
return its dense weights. ``prior="dense"`` shrinks towards the dense weights instead,
``(H_SS + lambda I) w_S = (C w)_S + lambda w_S``: it minimises
``||w_o^T X_d - w^T X_s||^2 + lambda ||w - w_o||^2`` on the mask, which is what the OBC /
SparseGPT update with a dampened ``H`` amounts to (their objective is ``dw^T (H + lambda I) dw``
with ``dw = w - w_o``).

Cost. Accumulating ``H, C, D`` costs ``3 K^2 P`` multiply-adds per layer in float64 (one
``K^2 P`` for ``target="pruned"`` or when ``x_s is x_d``); ``max_positions`` bounds ``P``.
The error report needs D only through ``||W_d X_d||^2``, so given the dense weights ``Gram``
sums that energy instead (``O K P``; reconstruct does this): ``2 K^2 P`` in all.
A position subsample gathers only the drawn patches (no full unfold, no padded copy).
Solving costs about ``k^3 / 3`` per output channel for ``k`` kept weights: each channel's system
is gathered to its kept entries only (not the full ``K x K`` masked matrix), so sparser layers
are cheaper to solve, and channels are solved in batches bounded by ``block_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Gram", "SolveInfo", "solve", "unfold_inputs", "SINGULAR_RTOL", "TARGETS", "PRIORS"]

TARGETS = ("dense", "pruned")
PRIORS = ("zero", "dense")

# A channel's Cholesky factor is rejected when a pivot L_ii^2 falls below this fraction of the
# diagonal entry A_ii (L_ii^2 / A_ii >= lambda_min / A_ii, so a tiny ratio means the kept block
# is numerically singular: the float64 solve would amplify the float32 input noise without
# bound). Such channels get the pseudo-inverse solution, which drops eigenvalues below
# SINGULAR_RTOL * lambda_max.
SINGULAR_RTOL = 1e-10

_MIB = 2**20


def _conv_padding(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top, bottom), (left, right) zero padding of ``layer``; resolves 'valid' and 'same' the
    way ``nn.Conv2d`` does (an odd total pad puts the extra row/column at the bottom/right)."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0), (0, 0)
        pads = []
        for d, k in zip(layer.dilation, layer.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads[0], pads[1]
    return (layer.padding[0],) * 2, (layer.padding[1],) * 2


def unfold_inputs(x: Tensor, layer: nn.Conv2d | nn.Linear, bias: bool | None = None,
                  positions: Tensor | None = None) -> Tensor:
    """Patch columns of a layer input, one column per output position, split by group.

    Args:
        x: the layer's input, ``[N, C_in, H, W]`` for ``nn.Conv2d``; ``[N, F]`` or
            ``[N, ..., F]`` for ``nn.Linear`` (leading dims are flattened into positions).
        layer: the layer whose geometry (kernel, stride, padding, dilation, groups) is used.
        bias: append a constant row of ones (the bias's input); default: ``layer.bias`` exists.
        positions: optional int64 flat position indices (``n * L + l``, on ``x``'s device):
            return only these columns, in this order, without building the others (what a
            position subsample costs is then the subsample only).

    Returns:
        ``[groups, K, P]`` in ``x``'s dtype and device (may be a view of ``x`` for Linear),
        ``K = C_in/groups * kh * kw (+1)`` ordered like ``layer.weight[o].flatten()``
        (channel, then kernel row, then column), so ``W.view(O, -1)`` of group g applied to
        block g gives the layer's output; positions ordered sample-major (``n * L + l``, L
        output positions per sample, row-major). The columns equal those of
        ``F.unfold(x, kernel_size, dilation, padding, stride)`` split by group.
        Linear: ``[1, F (+1), N * ...]``.

    Raises:
        TypeError: ``layer`` is neither ``nn.Conv2d`` nor ``nn.Linear``.
        ValueError: ``padding_mode`` other than 'zeros' (reflect / replicate / circular padding
            is not a zero-padded patch matrix), or an input shape that does not fit the layer.
    """
    if bias is None:
        bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        if x.dim() < 2 or x.shape[-1] != layer.in_features:
            raise ValueError(f"Linear input must be [N, ..., {layer.in_features}], "
                             f"got {tuple(x.shape)}")
        rows = x.reshape(-1, layer.in_features)
        cols = (rows if positions is None else rows[positions]).T.unsqueeze(0)   # [1, F, P]
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported: the "
                             "least-squares rebuild unfolds zero-padded patches only")
        if x.dim() != 4 or x.shape[1] != layer.in_channels:
            raise ValueError(f"Conv2d input must be [N, {layer.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        (top, bottom), (left, right) = _conv_padding(layer)
        n, g = x.shape[0], layer.groups
        (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
        if positions is None:
            # The same columns as F.unfold, built from strided windows of the padded input and
            # copied once, straight into the [G, Kg, N*L] layout: CPU im2col (F.unfold) plus
            # the permute copy measured about 4x slower on ResNet-20 feature maps.
            win = F.pad(x, (left, right, top, bottom))
            win = win.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
            win = win[..., ::dh, ::dw].unflatten(1, (g, layer.in_channels // g))
            ho, wo = win.shape[3], win.shape[4]
            # [N, G, Cg, Ho, Wo, kh, kw] -> [G, Cg, kh, kw, N, Ho, Wo]
            cols = win.permute(1, 2, 5, 6, 0, 3, 4).reshape(g, -1, n * ho * wo)
        else:
            # Gather only the chosen patches from the unpadded input; taps that fall in the
            # zero padding are set to 0. Padding the whole chunk first (F.pad, then indexing
            # the strided view) spent 21 s of a 181 s ResNet-56 reconstruct (1,024 images,
            # 4,096 positions per layer; python scripts/reconstruct_cost.py --profile) copying
            # maps of which ~1/256 was then read.
            size_h, size_w = x.shape[2], x.shape[3]
            ho = (size_h + top + bottom - dh * (kh - 1) - 1) // sh + 1
            wo = (size_w + left + right - dw * (kw - 1) - 1) // sw + 1
            loc = positions % (ho * wo)
            iy = (loc // wo)[:, None] * sh - top + torch.arange(kh, device=x.device) * dh
            ix = (loc % wo)[:, None] * sw - left + torch.arange(kw, device=x.device) * dw
            inside = (((iy >= 0) & (iy < size_h))[:, :, None]
                      & ((ix >= 0) & (ix < size_w))[:, None, :])               # [P, kh, kw]
            # advanced indices around a slice put the index dims first: [P, kh, kw, C]
            taps = x[(positions // (ho * wo))[:, None, None], :,
                     iy.clamp(0, size_h - 1)[:, :, None], ix.clamp(0, size_w - 1)[:, None, :]]
            taps = torch.where(inside[..., None], taps, taps.new_zeros(()))
            # [P, kh, kw, G*Cg] -> [G, Cg, kh, kw, P]
            cols = taps.permute(3, 1, 2, 0).reshape(g, -1, positions.numel())
    else:
        raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
    if bias:
        ones = torch.ones(cols.shape[0], 1, cols.shape[2], dtype=cols.dtype, device=cols.device)
        cols = torch.cat([cols, ones], dim=1)
    return cols


def _positions_per_sample(x: Tensor, layer: nn.Conv2d | nn.Linear) -> int:
    if isinstance(layer, nn.Linear):
        return math.prod(x.shape[1:-1])
    (top, bottom), (left, right) = _conv_padding(layer)
    out = []
    for size, pad, d, k, s in zip(x.shape[2:], (top + bottom, left + right), layer.dilation,
                                  layer.kernel_size, layer.stride):
        out.append((size + pad - d * (k - 1) - 1) // s + 1)
    return out[0] * out[1]


class Gram:
    """Float64 sums ``H = X_s X_s^T``, ``C = X_s X_d^T``, ``D = X_d X_d^T`` of one layer's
    paired inputs, ``[groups, K, K]`` each, accumulated chunk by chunk.

    Args:
        layer: the ``nn.Conv2d`` / ``nn.Linear`` layer (geometry only; never modified).
        target: ``"dense"`` (reproduce ``W_d X_d``; sums H, C, D) or ``"pruned"`` (reproduce
            ``W_d X_s``; only H is summed and ``C``, ``D`` are H).
        max_positions: use at most this many positions in all (None: every position).
        n_samples: how many samples (images, or rows of the leading dim) will be added in all;
            required with ``max_positions``, which is spread over them.
        seed: seed of the ``torch.Generator`` (CPU) that draws the positions.
        batch_bytes: bound on the float64 patch matrices built at once; a chunk is unfolded in
            slices of whole samples, so memory does not grow with the chunk.
        dense_weight, dense_bias: the dense layer's weight (``layer.weight``'s shape) and bias
            (present iff ``layer.bias`` is). When given with target "dense", D is not summed:
            ``energy`` (``sum ||W_d X_d||^2`` per group, ``O_g K P`` multiply-adds instead of
            D's ``K^2 P``) is, which is all the error report needs from D (``solve``).

    Without ``max_positions`` the sums do not depend on chunking (up to float64 rounding of the
    addition order). With ``max_positions = M`` and ``N = n_samples``, the chunk that holds
    samples ``[a, b)`` of the stream contributes ``floor(M b / N) - floor(M a / N)`` positions,
    drawn uniformly without replacement among its ``(b - a) * L`` positions (L per sample), the
    same positions for ``X_s`` and ``X_d``: the subsample is proportional per chunk and exactly
    ``M`` once all ``N`` samples are in; chunking then matters only through which positions are
    drawn. When ``N * L <= M`` every position is used. Deterministic for a given seed and chunk
    sequence on any device (indices are drawn on the CPU).

    Raises (``add``): ValueError for a missing ``x_d`` with target "dense", mismatched shapes,
    more samples than ``n_samples``, or non-finite inputs.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, *, target: str = "dense",
                 max_positions: int | None = None, n_samples: int | None = None, seed: int = 0,
                 batch_bytes: int = 256 * _MIB, dense_weight: Tensor | None = None,
                 dense_bias: Tensor | None = None):
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        self._w = None       # [G, O_g, K] float64 dense rows, when the energy replaces D
        if dense_weight is not None and target == "dense":
            if dense_weight.shape != layer.weight.shape or (dense_bias is None) != (
                    layer.bias is None):
                raise ValueError(f"dense_weight {tuple(dense_weight.shape)} (bias "
                                 f"{dense_bias is not None}) does not match the layer's weight "
                                 f"{tuple(layer.weight.shape)} (bias {layer.bias is not None})")
            groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
            w = dense_weight.detach().reshape(dense_weight.shape[0], -1).to(torch.float64)
            if dense_bias is not None:
                w = torch.cat([w, dense_bias.detach().to(torch.float64)[:, None]], dim=1)
            self._w = w.unflatten(0, (groups, -1))
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if max_positions is not None:
            if max_positions < 1:
                raise ValueError(f"max_positions must be >= 1, got {max_positions}")
            if n_samples is None or n_samples < 1:
                raise ValueError("max_positions needs n_samples (the total number of samples "
                                 "that will be added) to spread the positions over chunks")
        self.layer, self.target = layer, target
        self.max_positions, self.n_samples = max_positions, n_samples
        self.batch_bytes = int(batch_bytes)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.n = 0           # positions summed
        self.samples = 0     # samples seen
        self._h: Tensor | None = None
        self._c: Tensor | None = None
        self._d: Tensor | None = None
        self._energy: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []   # columns not yet summed (_flush)
        self._pending_bytes = 0

    @property
    def H(self) -> Tensor:  # noqa: N802 - the notation of the issue
        self._flush()
        if self._h is None:
            raise ValueError("no input was added")
        return self._h

    @property
    def C(self) -> Tensor:  # noqa: N802
        self._flush()
        return self.H if self._c is None else self._c

    @property
    def D(self) -> Tensor:  # noqa: N802
        self._flush()
        if self._w is not None:
            raise ValueError("D is not summed when dense_weight is given; use energy")
        return self.H if self._d is None else self._d

    @property
    def energy(self) -> Tensor | None:
        """``sum ||W_d,g X_d,g||_F^2`` per group, ``[G]`` float64, when built with
        ``dense_weight`` (target "dense"); else None."""
        self._flush()
        return self._energy

    def _draw(self, n: int, per_sample: int) -> Tensor | None:
        """Sorted flat indices (``i * L + l``) of the positions of this chunk to use; None for
        all of them."""
        m, total = self.max_positions, self.n_samples
        a, b = self.samples, self.samples + n
        if m is None:
            return None
        if b > total:
            raise ValueError(f"added {b} samples but n_samples={total}: the position budget "
                             "was spread over n_samples")
        if total * per_sample <= m:
            return None
        quota = min((m * b) // total - (m * a) // total, n * per_sample)
        return torch.randperm(n * per_sample, generator=self.generator)[:quota].sort().values

    def add(self, x_s: Tensor, x_d: Tensor | None = None) -> None:
        """Add one chunk: ``x_s`` the layer's input in the pruned model, ``x_d`` in the dense
        model (same samples, same shape; ignored for target "pruned"). Any float dtype; sums
        are float64 on the inputs' device."""
        if self.target == "pruned":
            x_d = None
        elif x_d is None:
            raise ValueError("target 'dense' needs x_d, the dense model's input of the layer")
        same = x_d is None or x_d is x_s
        if not same and x_d.shape != x_s.shape:
            raise ValueError(f"x_s {tuple(x_s.shape)} and x_d {tuple(x_d.shape)} differ")
        n = x_s.shape[0]
        per_sample = _positions_per_sample(x_s, self.layer)
        picked = self._draw(n, per_sample)
        k = unfold_inputs(x_s[:1], self.layer).shape[1]  # validates the shape, too
        pieces: list[tuple[Tensor, Tensor]] = []         # this chunk's (X_s, X_d) columns
        # slices of whole samples: each slice's float64 patch matrices stay under batch_bytes
        step = max(1, self.batch_bytes // max(1, 8 * k * per_sample * (1 if same else 2)))
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            cols = None
            if picked is not None:
                lo, hi = torch.searchsorted(picked, torch.tensor([i0, i1]) * per_sample).tolist()
                if lo == hi:
                    continue
                cols = (picked[lo:hi] - i0 * per_sample).to(x_s.device)
            xs = self._cols(x_s[i0:i1], cols)
            xd = xs if same else self._cols(x_d[i0:i1], cols)
            # checked before anything of this chunk is kept: a failed add adds nothing
            if not (torch.isfinite(xs).all() and (same or torch.isfinite(xd).all())):
                raise ValueError("layer input has non-finite values: the model's forward "
                                 "pass is not finite on the calibration images (check the "
                                 "weights with torch.isfinite and the images for NaN/Inf)")
            pieces.append((xs, xd))
        self._pending += pieces
        self._pending_bytes += sum(8 * a.numel() * (1 if a is b else 2) for a, b in pieces)
        self.n += sum(a.shape[2] for a, _ in pieces)
        self.samples += n
        if self._pending_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        """Sum the buffered columns into H, C and D (or the energy). Columns are buffered up to
        ``batch_bytes`` so that a position subsample costs one large product per layer instead
        of one per chunk slice: the many small float64 products (and their thread start-ups)
        took 42 s of a 163 s ResNet-56 reconstruct on 2 loaded cores (1,024 images, 4,096
        positions per layer; ``python scripts/reconstruct_cost.py --profile``)."""
        if not self._pending:
            return
        xs = torch.cat([a for a, _ in self._pending], dim=2)
        same = all(a is b for a, b in self._pending)
        xd = xs if same else torch.cat([b for _, b in self._pending], dim=2)
        self._pending, self._pending_bytes = [], 0
        h = xs @ xs.transpose(1, 2)
        if self._h is None:
            self._h = torch.zeros_like(h)
            if self.target == "dense":
                self._c = torch.zeros_like(h)
                if self._w is None:
                    self._d = torch.zeros_like(h)
                else:
                    self._energy = h.new_zeros(h.shape[0])
        self._h += h
        if self._c is not None:
            self._c += h if same else xs @ xd.transpose(1, 2)
        if self._d is not None:
            self._d += h if same else xd @ xd.transpose(1, 2)
        if self._energy is not None:
            self._energy += (self._w.to(xd.device) @ xd).square().sum(dim=(1, 2))

    def _cols(self, x: Tensor, cols: Tensor | None) -> Tensor:
        # float64 so that H is float64 exact (unfolding only copies values); cast the input
        # before unfolding all of it (one float64 copy), the few picked columns after
        if cols is None:
            return unfold_inputs(x.to(torch.float64), self.layer)
        return unfold_inputs(x, self.layer, positions=cols).to(torch.float64)


@dataclass
class SolveInfo:
    """What ``solve`` did for one layer.

    kept: kept weights (the bias is not counted). rel_err_before / rel_err_after:
    ``||W_d X_d - W X_s||_F / ||W_d X_d||_F`` (target "pruned": ``X_d`` read as ``X_s``) for the
    masked dense weights and for the written-back result (in the layer's dtype), from H, C, D
    (None when D was not given; rounding limits it to about 1e-8 absolute). They are in-sample:
    measured on the positions summed into H (the subsample under ``max_positions``), on which
    the weights were also fit. cond_h: largest
    over groups of ``lambda_max / lambda_min`` of the undamped H (inf when singular; None when
    not computed). lam: the damping added, per group. fallback: output channels whose Cholesky
    factorisation failed or was numerically singular and that got the pseudo-inverse solution.
    blocks: batched solves run."""
    kept: int
    rel_err_before: float | None
    rel_err_after: float | None
    cond_h: float | None
    lam: list[float] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    blocks: int = 0


def _sq_err(w_d: Tensor, w: Tensor, h: Tensor, c: Tensor, ref: float) -> float:
    """Squared error ``ref - 2 sum_o w^T C w_d + sum_o w^T H w`` of one group, ``ref`` being
    ``sum_o w_d^T D w_d = ||W_d X_d||^2``; ``w_d``, ``w``: ``[O_g, K]``."""
    return ref - 2 * float(((w @ c) * w_d).sum()) + float(((w @ h) * w).sum())


def _blocks(counts: Tensor, budget: int) -> list[tuple[int, int]]:
    """Split channels sorted by ascending kept count into ranges whose padded systems
    (``len * k_max^2`` float64, about 4 copies live) fit ``budget`` bytes; at least 1 each."""
    out, s, n = [], 0, counts.numel()
    while s < n:
        k = counts[s:].to(torch.float64)
        sizes = torch.arange(1, n - s + 1, dtype=torch.float64) * k * k * 8 * 4
        e = s + max(1, int((sizes <= budget).sum()))  # monotone: k is ascending
        out.append((s, e))
        s = e
    return out


def _solve_block(a: Tensor, b: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the SPD batch ``a x = b`` ([B, k, k], [B, k]) by Cholesky; channels whose factor
    fails, is numerically singular (pivot ratio < SINGULAR_RTOL) or gives non-finite values get
    the minimum-norm solution about ``x0``: ``x0 + pinv(a) (b - a x0)``. Returns x and the
    fallback flags [B]."""
    chol, info = torch.linalg.cholesky_ex(a)
    piv = torch.diagonal(chol, dim1=-2, dim2=-1) ** 2 / torch.diagonal(a, dim1=-2, dim2=-1)
    ok = (info == 0) & (piv.nan_to_num(0.0).amin(dim=1) >= SINGULAR_RTOL)
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    chol = torch.where(ok[:, None, None], chol, eye)  # keep failed factors from spreading NaN
    x = torch.cholesky_solve(b.unsqueeze(2), chol).squeeze(2)
    ok &= torch.isfinite(x).all(dim=1)
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():
        ab, x0b = a[bad], x0[bad]
        r = b[bad] - (ab @ x0b.unsqueeze(2)).squeeze(2)
        pinv = torch.linalg.pinv(ab, rtol=SINGULAR_RTOL, hermitian=True)
        x[bad] = x0b + (pinv @ r.unsqueeze(2)).squeeze(2)
    return x, ~ok


def solve(weight: Tensor, mask: Tensor, H: Tensor, C: Tensor, D: Tensor | None = None,  # noqa: N803
          *, damping: float = 0.01, bias: Tensor | None = None, prior: str = "zero",
          block_bytes: int = 256 * _MIB, cond: bool = True, energy: Tensor | None = None
          ) -> tuple[Tensor, Tensor | None, SolveInfo]:
    """Least-squares rebuild of one layer's kept weights (module docstring for the rule).

    Args:
        weight: the dense weights, ``[O, C_in/groups, kh, kw]`` or ``[O, F]``, any float dtype.
        mask: kept entries, same shape (bool, or 0/1).
        H, C: ``[groups, K, K]`` float64 from ``Gram`` (``K = weight[0].numel() + (bias is not
            None)``); D: the same, optional, only for the error report.
        damping: ``lambda = damping * mean(diag H_g)`` per group g (OBC / SparseGPT's dampening;
            1e-2 there). ``>= 0``.
        bias: the dense bias ``[O]`` or None; when given, H and C must have the constant row
            last and the bias is refit (always kept).
        prior: ``"zero"`` (the issue's ridge rule) or ``"dense"`` (shrink towards the dense
            weights; with ``X_s == X_d`` and nothing pruned it returns them for any damping).
        block_bytes: memory budget of one batched solve; channels are solved in blocks of
            similar kept count (sorted, stable), each system gathered to its kept entries and
            padded with decoupled identity rows to the block's largest count.
        cond: compute ``SolveInfo.cond_h`` (an eigendecomposition of H per group, ``K^3``).
        energy: ``[groups]`` float64, ``sum ||W_d X_d||^2`` per group (``Gram.energy``): all
            the error report needs from D, so either may be given (energy wins).

    Returns:
        ``(new_weight, new_bias, info)``: dtype and device of ``weight`` / ``bias``, pruned
        entries exactly 0; ``new_bias`` None without ``bias``. All linear algebra is float64 on
        H's device; the result is deterministic for the same inputs and device.

    Raises:
        ValueError: mismatched shapes, negative damping, unknown prior, non-finite H / C, or a
            solution that does not fit the layer's dtype (fp16 overflow).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    o_all = weight.shape[0]
    kw = weight[0].numel()
    k = kw + (bias is not None)
    if H.dim() != 3 or H.shape[1:] != (k, k) or o_all % H.shape[0]:
        raise ValueError(f"H {tuple(H.shape)} does not fit weight {tuple(weight.shape)} "
                         f"{'with' if bias is not None else 'without'} bias: expected "
                         f"[groups, {k}, {k}] with groups dividing {o_all}")
    for name, m in (("C", C), ("D", D)):
        if m is not None and m.shape != H.shape:
            raise ValueError(f"{name} {tuple(m.shape)} does not match H {tuple(H.shape)}")
    if energy is not None and energy.shape != H.shape[:1]:
        raise ValueError(f"energy {tuple(energy.shape)} does not match {H.shape[0]} groups")
    if bias is not None and bias.shape != (o_all,):
        raise ValueError(f"bias {tuple(bias.shape)} does not match {o_all} output channels")
    if not (torch.isfinite(H).all() and torch.isfinite(C).all()):
        raise ValueError("H or C has non-finite entries; accumulate them from finite layer "
                         "inputs (Gram.add refuses NaN/Inf inputs)")

    dev, f64 = H.device, torch.float64
    groups = H.shape[0]
    o_g = o_all // groups
    w_full = weight.detach().reshape(o_all, kw).to(dev, f64)
    m_full = mask.detach().reshape(o_all, kw).to(dev).bool()
    if bias is not None:
        w_full = torch.cat([w_full, bias.detach().to(dev, f64)[:, None]], dim=1)
        m_full = torch.cat([m_full, torch.ones(o_all, 1, dtype=torch.bool, device=dev)], dim=1)
    new_full = torch.zeros_like(w_full)
    info = SolveInfo(kept=int(m_full[:, :kw].sum()), rel_err_before=None, rel_err_after=None,
                     cond_h=None)

    for g in range(groups):
        rows = slice(g * o_g, (g + 1) * o_g)
        h, w, m = H[g].to(f64), w_full[rows], m_full[rows]
        scale = float(torch.diagonal(h).mean())
        lam = damping * scale
        info.lam.append(lam)
        filler = scale if scale > 0 else 1.0  # pruned / padding rows: decoupled, same scale
        # 0-dim float64 tensors: a Python scalar in torch.where would come back float32
        lam_t = torch.tensor(lam, dtype=f64, device=dev)
        fill_t = torch.tensor(filler, dtype=f64, device=dev)
        rhs_full = w @ C[g].to(f64).T          # row o: (C w_o)^T, [O_g, K]
        counts = m.sum(dim=1)
        order = torch.sort(counts, stable=True).indices
        # kept indices first (ascending), then the pruned ones: a full permutation per row, so
        # the padding slots index distinct pruned entries and the scatter below is one-to-one
        perm = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices
        for s, e in _blocks(counts[order].cpu(), block_bytes):
            r = order[s:e]
            kmax = int(counts[r].max())
            if kmax == 0:  # channels with nothing kept (and no bias) stay all zero
                continue
            idx = perm[r, :kmax]                                        # [B, kmax]
            valid = torch.arange(kmax, device=dev) < counts[r, None]    # [B, kmax]
            a = h[idx[:, :, None], idx[:, None, :]]
            a = a * (valid[:, :, None] & valid[:, None, :])
            a = a + torch.diag_embed(torch.where(valid, lam_t, fill_t))
            x0 = torch.zeros_like(valid, dtype=f64) if prior == "zero" \
                else w[r].gather(1, idx) * valid
            b = rhs_full[r].gather(1, idx) * valid + lam * x0
            x, failed = _solve_block(a, b, x0)
            new_full[g * o_g + r] = torch.zeros(len(r), k, dtype=f64, device=dev).scatter_(
                1, idx, x * valid)
            info.fallback.extend((g * o_g + r[failed]).tolist())
            info.blocks += 1
    info.fallback.sort()

    new_full = new_full * m_full  # the mask exactly: pruned entries are 0.0, never -0.0 or 1e-300
    new_weight = new_full[:, :kw].reshape(weight.shape).to(weight.device, weight.dtype)
    new_bias = None if bias is None else new_full[:, kw].to(bias.device, bias.dtype)
    if not (torch.isfinite(new_weight).all() and (new_bias is None
                                                  or torch.isfinite(new_bias).all())):
        raise ValueError(f"the rebuilt weights overflow {weight.dtype}")

    if D is not None or energy is not None:
        # the error of what is written back: the cast to the layer's dtype included
        written = new_weight.detach().reshape(o_all, kw).to(dev, f64)
        if bias is not None:
            written = torch.cat([written, new_bias.detach().to(dev, f64)[:, None]], dim=1)
        before = after = ref = 0.0
        for g in range(groups):
            rows = slice(g * o_g, (g + 1) * o_g)
            h, c, w_d = H[g].to(f64), C[g].to(f64), w_full[rows]
            ref_g = float(energy[g]) if energy is not None else float(
                ((w_d @ D[g].to(f64)) * w_d).sum())
            e0 = _sq_err(w_d, w_d * m_full[rows], h, c, ref_g)
            e1 = _sq_err(w_d, written[rows], h, c, ref_g)
            before, after, ref = before + e0, after + e1, ref + ref_g
        info.rel_err_before = _ratio(before, ref)
        info.rel_err_after = _ratio(after, ref)
    if cond:
        ev = torch.linalg.eigvalsh(H.to(f64))  # ascending, [G, K]
        lo, hi = ev[:, 0], ev[:, -1]
        ratios = torch.where(lo > 0, hi / lo.clamp(min=torch.finfo(f64).tiny),
                             torch.full_like(hi, math.inf))
        info.cond_h = float(ratios.max())
    return new_weight, new_bias, info


def _ratio(err: float, ref: float) -> float:
    """sqrt(err / ref), err clamped at 0 (the expansion can round slightly negative)."""
    err = max(err, 0.0)
    if ref <= 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / ref)
