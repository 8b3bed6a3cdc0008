"""Where ASR's time goes on one model: one dense + one pruned eval forward (the reference) against
the repair, and the part of the repair spent summing per-channel moments.

    python scripts/bench_repair_share.py --model densenet121 --images 256 [--device cuda]

Random weights with real BN statistics, ERK 90%, chunks of 128. Run it at two commits to compare
an engine change; the ratio (repair / reference) is what the speed benchmark gates."""

from __future__ import annotations

import argparse
import copy
import time

import torch

import sparse_repair.repair.engine as engine
from sparse_repair.allocation import allocate
from sparse_repair.evaluate import forward_seconds, synchronize
from sparse_repair.models import random_with_batch_statistics
from sparse_repair.pruning import prune_
from sparse_repair.repair import repair
from sparse_repair.runtime import tune_allocator

CHUNK = 128  # images per chunk, for the repair and the reference forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--images", type=int, default=256, help="calibration images")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tune_allocator()
    dense = random_with_batch_statistics(args.model, 0).to(args.device)
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    images = torch.randn(args.images, 3, 32, 32,
                         generator=torch.Generator().manual_seed(0)).to(args.device)
    forward_seconds(dense, images[:CHUNK], CHUNK)  # warm-up
    reference = forward_seconds(dense, images, CHUNK) + forward_seconds(pruned, images, CHUNK)
    summing = [0.0]
    real = engine.chunk_moments

    def timed(*a, **k):
        synchronize(args.device)
        start = time.perf_counter()
        out = real(*a, **k)
        synchronize(args.device)
        summing[0] += time.perf_counter() - start
        return out

    engine.chunk_moments = timed
    try:
        report = repair(copy.deepcopy(pruned), "asr", images, dense=dense, chunk_size=CHUNK)
    finally:
        engine.chunk_moments = real
    print(f"{args.model} {args.images} images on {args.device}: reference {reference:.2f} s, "
          f"asr {report.seconds:.2f} s ({report.seconds / reference:.2f}x, path {report.path}), "
          f"moment sums {summing[0]:.2f} s")


if __name__ == "__main__":
    main()
