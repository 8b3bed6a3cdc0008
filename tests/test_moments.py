"""Moment arithmetic: re-shifting and concatenating moments gives what summing afresh gives."""

from __future__ import annotations

import torch

from sparse_repair.repair.moments import chunk_moments, concat, reshift

FIELDS = ("s1_s", "s2_s", "s1_d", "s2_d", "s_ds")


def _activations(seed: int, channels: int):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(8, channels, 5, 5, generator=g, dtype=torch.float64) * 3 + 7
    s = 0.5 * d + torch.randn(8, channels, 5, 5, generator=g, dtype=torch.float64)
    return s, d


def _close(a, b, what):
    for f in FIELDS + ("shift",):
        assert torch.allclose(getattr(a, f), getattr(b, f), rtol=1e-10, atol=1e-8), \
            f"{what}: field {f} differs from the moments summed afresh"
    assert a.n == b.n


def test_reshift_equals_summing_about_the_new_reference():
    s, d = _activations(0, 4)
    old, new = torch.full((4,), 5.0), torch.tensor([6.0, 7.5, -1.0, 0.0])
    _close(reshift(chunk_moments(s, d, old), new), chunk_moments(s, d, new), "reshift")


def test_reshift_keeps_the_derived_statistics():
    s, d = _activations(1, 3)
    a = chunk_moments(s, d, torch.zeros(3))
    b = reshift(a, torch.tensor([100.0, -3.0, 7.0]))
    for name in ("mean_s", "mean_d", "var_s", "var_d", "rho"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-9), name


def test_concat_equals_moments_of_the_concatenation():
    (s1, d1), (s2, d2) = _activations(2, 3), _activations(3, 2)
    shift = torch.arange(5.0)
    whole = chunk_moments(torch.cat([s1, s2], 1), torch.cat([d1, d2], 1), shift)
    parts = concat([chunk_moments(s1, d1, shift[:3]), chunk_moments(s2, d2, shift[3:])])
    _close(parts, whole, "concat")
