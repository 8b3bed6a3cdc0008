"""sparse-repair: exact sparsity allocation, magnitude pruning and label-free repair for CNNs.

Layout (each layer imports only those above it):
    models, allocation, config -> nothing else of the package
    pruning                -> allocation
    repair                 -> models' tensors only; never the data layer (label-free by design)
    data, weights, evaluate, train
    study, cli             -> everything
"""

__version__ = "0.1.0"
