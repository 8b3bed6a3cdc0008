"""Reproduces the numbers in docs/repair.md, "Architectures (the zoo)": bn_recal's relative output
error against the dense model, with the dense reference set by one train-mode pass only
("trainmode") or then made its own eval-mode forward by bn_recal of the dense model
("selfconsistent", what tests/test_zoo.py uses).

    python scripts/zoo_bn_reference.py selfconsistent
    python scripts/zoo_bn_reference.py trainmode
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_zoo import REPAIR_IMAGES, SIDE, _rel_err, _set_batch_statistics  # noqa: E402

from sparse_repair.allocation import allocate  # noqa: E402
from sparse_repair.pruning import prune_  # noqa: E402
from sparse_repair.repair import repair  # noqa: E402


def main(mode: str) -> None:
    torch.set_num_threads(1)
    for name in ["mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small", "resnet18"]:
        for sparsity in [0.0, 0.1, 0.5]:
            torch.manual_seed(0)
            dense = torchvision.models.get_model(name, weights=None, num_classes=10)
            images = torch.randn(REPAIR_IMAGES, 3, SIDE, SIDE)
            _set_batch_statistics(dense, images)
            if mode == "selfconsistent":
                repair(dense, "bn_recal", images)
            pruned = copy.deepcopy(dense)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prune_(pruned, allocate(pruned, "erk", sparsity))
            with torch.no_grad():
                yd, y0 = dense(images), pruned(images)
                model = copy.deepcopy(pruned)
                repair(model, "bn_recal", images, dense=dense)
                y1 = model(images)
                other = torch.randn(REPAIR_IMAGES, 3, SIDE, SIDE)
                od, o0, o1 = dense(other), pruned(other), model(other)
            print(f"{name} {sparsity}: in-sample {_rel_err(y0, yd):.3f} -> {_rel_err(y1, yd):.3f}"
                  f" | other images {_rel_err(o0, od):.3f} -> {_rel_err(o1, od):.3f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("selfconsistent", "trainmode"):
        raise SystemExit("usage: python scripts/zoo_bn_reference.py selfconsistent|trainmode")
    main(sys.argv[1])
