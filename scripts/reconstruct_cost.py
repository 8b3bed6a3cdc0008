"""What reconstruct costs against one dense + one pruned eval forward over the same calibration
images (the ratio benchmarks/test_repair_speed.py gates at 3x), with the optional cProfile of the
repair to see where its time goes.

    python scripts/reconstruct_cost.py --models resnet20 resnet56 [--profile]

Random weights with real BN statistics, ERK 90%, 1,024 Gaussian images, chunks of 256, the
default options: the benchmark's setting. To compare two versions of the code side by side,
run it on both in the same quiet stretch of machine time, for example
    old=$(mktemp -d) && git archive <rev> sparse_repair | tar -x -C "$old"
    PYTHONPATH="$old" python scripts/reconstruct_cost.py; python scripts/reconstruct_cost.py
The ratio is only meaningful on an otherwise idle machine: with more busy threads than cores
the many small float64 operations of reconstruct slow down far more than the convolutions of
the reference (3.14x at a load average of ~20 against 1.83x idle, same code)."""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats

import torch

import sparse_repair
from sparse_repair.allocation import allocate
from sparse_repair.evaluate import forward_seconds
from sparse_repair.models import random_with_batch_statistics
from sparse_repair.pruning import prune_
from sparse_repair.repair import repair

CHUNK = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many, interleaved")
    ap.add_argument("--profile", action="store_true", help="print the top 20 of a cProfile")
    args = ap.parse_args()
    print(f"code: {os.path.dirname(sparse_repair.__file__)}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for name in args.models:
        dense = random_with_batch_statistics(name, 0)
        pruned = copy.deepcopy(dense)
        prune_(pruned, allocate(pruned, "erk", 0.9))
        calib = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        forward_seconds(dense, calib[:CHUNK], CHUNK)                      # warm-up
        ref = best = float("inf")
        for _ in range(args.rounds):
            ref = min(ref, forward_seconds(dense, calib, CHUNK)
                      + forward_seconds(pruned, calib, CHUNK))
            best = min(best, repair(copy.deepcopy(pruned), "reconstruct", calib, dense=dense,
                                    chunk_size=CHUNK).seconds)
        print(f"{name}: reference {ref:.2f}s, reconstruct {best:.2f}s, ratio {best / ref:.2f}x")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            repair(copy.deepcopy(pruned), "reconstruct", calib, dense=dense, chunk_size=CHUNK)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
