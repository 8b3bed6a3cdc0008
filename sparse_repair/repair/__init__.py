"""Label-free repair of a pruned model from unlabeled images (no labels, no gradients).

``repair(pruned, method, calibration, dense=None, **options) -> RepairReport`` works in place on
``pruned``. This package never imports the data layer: it sees image tensors only, so labels
cannot reach it. Definitions (docs/repair.md): BatchNorm layers of P are processed in forward
order; at BN b with dense running statistics (m, v) and affine (gamma, beta), channel c of b's
input has dense/pruned means mu_d, mu_s, variances var_d, var_s and correlation rho.

Layout: ``api`` (repair, RepairReport, input and model checks, the all-or-nothing guarantee),
``methods`` (one class per method, its options dataclass and metadata; the registry REPAIRS and
list_repairs), ``engine`` (BN plan, model snapshots, paired execution, path choice and
fallback), ``moments`` (moments and shrinkage rules), ``reconstruct`` (the layer-wise
reconstruction walk) over ``lstsq`` (its least-squares core). What is supported and refused:
docs/repair.md.
"""

from .api import RepairReport, as_image_tensor, check_dense, check_model, repair
from .engine import BNPlan, BNSite, FrontierTooLarge, ModelState, PassResult, plan_batchnorms
from .methods import (
    REPAIRS,
    ASROptions,
    ClippedASROptions,
    EngineOptions,
    NoOptions,
    PairedMethod,
    RepairMethod,
    list_repairs,
    register,
    set_statistics,
)

__all__ = [
    "REPAIRS",
    "ASROptions",
    "BNPlan",
    "BNSite",
    "ClippedASROptions",
    "EngineOptions",
    "FrontierTooLarge",
    "ModelState",
    "NoOptions",
    "PairedMethod",
    "PassResult",
    "RepairMethod",
    "RepairReport",
    "as_image_tensor",
    "check_dense",
    "check_model",
    "list_repairs",
    "plan_batchnorms",
    "register",
    "repair",
    "set_statistics",
]
