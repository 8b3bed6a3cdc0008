"""Time the paired per-channel moments of one calibration chunk: the elementwise form
(products materialized, then reduced) against the batched-dot form used on CPU.

    python scripts/bench_moments.py [--rounds 15]

Prints the best time of each form per activation shape (ms), interleaved so that machine noise
hits both alike."""

from __future__ import annotations

import argparse
import time

import torch

from sparse_repair.repair import moments as stats

SHAPES = [(256, 16, 32, 32), (256, 32, 16, 16), (256, 64, 8, 8), (256, 256, 4, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        s, d = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        dims = [0, 2, 3]
        forms = {"elementwise": stats._sums_elementwise, "bmm": stats._sums_bmm}
        best = dict.fromkeys(forms, float("inf"))
        for _ in range(args.rounds):
            for name, dot in forms.items():
                t0 = time.perf_counter()
                dot(s, s, dims), dot(d, d, dims), dot(d, s, dims)
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
        ratio = best["bmm"] / best["elementwise"]
        print(f"{'x'.join(map(str, shape)):>14}  elementwise {best['elementwise']:7.2f} ms  "
              f"bmm {best['bmm']:7.2f} ms  ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
