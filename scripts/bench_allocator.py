"""Page faults, system time and wall time of eval forwards with glibc's default allocator
thresholds and with `sparse_repair.runtime.tune_allocator()`, each in a fresh process.

    python scripts/bench_allocator.py [--resolution 64] [--batch 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from sparse_repair.models import create_model
from sparse_repair.runtime import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else False
res, batch = int(sys.argv[2]), int(sys.argv[3])
m = create_model("resnet20").eval()
x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    m(x[:8])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(4):
        m(x)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "wall_s": time.perf_counter() - t0,
                  "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    env = {"SPARSE_REPAIR_MALLOC": ""}
    for r in range(args.repeats):
        for mode in ("default", "tuned"):  # interleaved, so machine noise hits both alike
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.resolution),
                                  str(args.batch)], capture_output=True, text=True, check=True,
                                 env={**os.environ, **env})
            m = json.loads(out.stdout)
            print(f"repeat {r} {mode:>7}: wall {m['wall_s']:.2f}s  sys {m['sys_s']:.2f}s  "
                  f"minor faults {m['minor_faults']}  (applied={m['applied']})")


if __name__ == "__main__":
    main()
