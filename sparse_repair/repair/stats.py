"""Pure statistics for label-free repair: per-channel moments of paired activations, merged
across chunks in float64, and the shrinkage rules of ASR. No modules, no hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Moments:
    """Per-channel pooled moments of a dense input d and a pruned input s (float64 vectors).
    ``m2_*`` are sums of squared deviations and ``c`` the sum of co-deviations."""
    n: int
    mean_d: torch.Tensor | None
    mean_s: torch.Tensor
    m2_d: torch.Tensor | None
    m2_s: torch.Tensor
    c: torch.Tensor | None

    @property
    def var_s(self) -> torch.Tensor:
        return self.m2_s / self.n

    @property
    def var_d(self) -> torch.Tensor:
        return self.m2_d / self.n

    @property
    def rho(self) -> torch.Tensor:
        """cov(d, s) / (sd_d sd_s); 0 where undefined (a constant channel)."""
        denom = torch.sqrt(self.m2_d * self.m2_s)
        ok = denom > 1e-12 * torch.clamp(self.m2_d + self.m2_s, min=1e-300)
        return torch.where(ok & (denom > 0), self.c / torch.where(denom > 0, denom, 1.0),
                           torch.zeros_like(denom)).clamp(-1.0, 1.0)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def chunk_moments(s: torch.Tensor, d: torch.Tensor | None = None) -> Moments:
    """Moments of one chunk. Deviations are taken from the chunk's own mean in float32 (torch's
    reductions are pairwise, so a chunk of ~10^5 values per channel loses < 1e-6 relative);
    everything is returned in float64 so that merging chunks is exact to float64 rounding."""
    dims = _reduce_dims(s)
    n = s.numel() // s.shape[1]
    var_s, mean_s = torch.var_mean(s, dims, correction=0, keepdim=True)
    if d is None:
        return Moments(n, None, mean_s.flatten().double(), None,
                       (var_s.flatten().double() * n), None)
    var_d, mean_d = torch.var_mean(d, dims, correction=0, keepdim=True)
    c = ((d - mean_d) * s).sum(dims)  # sum(dc * s) = sum(dc * sc) because sum(dc) = 0
    return Moments(n, mean_d.flatten().double(), mean_s.flatten().double(),
                   var_d.flatten().double() * n, var_s.flatten().double() * n, c.double())


def merge(a: Moments | None, b: Moments) -> Moments:
    """Chan et al.'s parallel combination of two sets of moments (float64)."""
    if a is None:
        return b
    n = a.n + b.n
    w = a.n * b.n / n
    ds = b.mean_s - a.mean_s
    mean_s = a.mean_s + ds * (b.n / n)
    m2_s = a.m2_s + b.m2_s + ds * ds * w
    if a.mean_d is None:
        return Moments(n, None, mean_s, None, m2_s, None)
    dd = b.mean_d - a.mean_d
    return Moments(n, a.mean_d + dd * (b.n / n), mean_s, a.m2_d + b.m2_d + dd * dd * w, m2_s,
                   a.c + b.c + dd * ds * w)


# ----------------------------------------------------------------------------- shrinkage
# kappa_c in [0, 1] multiplies gamma_c after channel-wise variance matching. Inputs: the
# merged moments, the BN's dense running variance v and eps. Output: float64 kappa.

Shrinkage = Callable[[Moments, torch.Tensor, float], torch.Tensor]


def _rho_pos(m: Moments) -> torch.Tensor:
    return m.rho.clamp(min=0.0)


def shrink_none(m, v, eps):
    return torch.ones_like(m.mean_s)


def shrink_correlation(m, v, eps):
    # The MMSE gain for predicting the dense channel from the pruned one.
    return _rho_pos(m)


def shrink_relative(m, v, eps):
    r = _rho_pos(m)
    med = r.median()
    return torch.where(med > 0, (r / med).clamp(max=1.0), torch.zeros_like(r))


def shrink_relative_soft(m, v, eps):
    """Damp only clearly unreliable channels: kappa = clip((rho - t0) / (t1 - t0), 0, 1) with the
    thresholds at fixed fractions of the layer's median correlation (t0 = 0.5 med, t1 = med)."""
    r = _rho_pos(m)
    med = r.median()
    if med <= 0:
        return torch.zeros_like(r)
    return ((r - 0.5 * med) / (0.5 * med)).clamp(0.0, 1.0)


def shrink_pooled(m, v, eps):
    """Shrink each channel's variance-matching gain toward the layer's pooled gain, weighted by
    rho: G = rho G_c + (1 - rho) G_layer, expressed as kappa = G / G_c (capped at 1)."""
    r = _rho_pos(m)
    g_c = torch.sqrt((v + eps) / (m.var_s + eps))
    g_layer = torch.sqrt((v + eps).sum() / (m.var_s + eps).sum())
    g = r * g_c + (1 - r) * g_layer
    return (g / g_c).clamp(0.0, 1.0)


SHRINKAGE: dict[str, Shrinkage] = {
    "none": shrink_none,
    "correlation": shrink_correlation,
    "relative": shrink_relative,
    "relative_soft": shrink_relative_soft,
    "pooled": shrink_pooled,
}


def dead_channels(m: Moments, v: torch.Tensor) -> torch.Tensor:
    """Channels whose pruned input is constant (every input weight pruned): gain 0."""
    return m.var_s <= 1e-12 * torch.clamp(v, min=1e-12)
