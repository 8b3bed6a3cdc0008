"""Does a study store reproduce a committed report? Compares every cell of an earlier
``cells.csv`` (a git revision's copy, or a file) with the mean of the same cell's first n seeds
in the store, where n is the old cell's seed count and the store holds all of those seeds.

Why: the fifth session's evidence store was lost and the study re-run from zero; its partial
reports committed along the way (docs/evidence/cells.csv at each revision) hold seed-0 values
(cells with n = 1) and means over the first seeds, which a deterministic re-run must match
exactly (top-1 is a count of correct images x 100 / 10,000).

    python scripts/reproduce_cells.py --rev 756e253 --db results/evidence.sqlite
    python scripts/reproduce_cells.py --csv old/cells.csv --db results/evidence.sqlite

Prints the number of comparable cells, the largest absolute difference, and every cell that
differs; exits 1 when any does. A cell whose seeds were not the first n (a partial store that
skipped one) would show up here as a difference, so read a mismatch with that in mind.
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import subprocess
import sys

import pandas as pd

KEY = ["model", "dataset", "allocation", "sparsity", "repair"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rev", help="git revision whose docs/evidence/cells.csv to compare")
    src.add_argument("--csv", help="a cells.csv file to compare")
    p.add_argument("--path", default="docs/evidence/cells.csv", help="path of cells.csv at --rev")
    p.add_argument("--db", required=True, help="the study's result store (SQLite)")
    p.add_argument("--tolerance", type=float, default=1e-9,
                   help="largest difference counted as equal, pt (default: 1e-9, float noise)")
    args = p.parse_args(argv)
    if args.rev:
        text = subprocess.run(["git", "show", f"{args.rev}:{args.path}"], check=True,
                              capture_output=True, text=True).stdout
        old = pd.read_csv(io.StringIO(text))
    else:
        old = pd.read_csv(args.csv)
    with sqlite3.connect(args.db) as con:
        new = pd.read_sql(f"SELECT {', '.join(KEY)}, seed, top1 FROM results", con)
    rows = []
    for _, cell in old.iterrows():
        n = int(cell["n"])
        mask = (new[KEY] == cell[KEY].values).all(axis=1) & new["seed"].isin(range(n))
        seeds = new[mask]
        if seeds["seed"].nunique() != n:
            continue  # the store does not hold this cell's first n seeds (yet)
        rows.append({**cell[KEY].to_dict(), "n": n, "old": float(cell["mean"]),
                     "new": float(seeds["top1"].mean())})
    if not rows:
        print("no comparable cell: the store holds none of the old cells' first seeds yet")
        return 0
    t = pd.DataFrame(rows)
    t["diff"] = t["new"] - t["old"]
    bad = t[t["diff"].abs() > args.tolerance]
    print(f"{len(t)} comparable cells (seed counts {sorted(t['n'].unique().tolist())}); "
          f"max |new - old| = {t['diff'].abs().max():.2e} pt; {len(bad)} differ")
    if len(bad):
        print(bad.to_string(index=False))
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
