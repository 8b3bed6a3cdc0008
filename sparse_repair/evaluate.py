"""Top-1/top-5 accuracy on a fixed class-stratified subset (or the full split)."""

from __future__ import annotations

import time

import torch
from torch import nn

from .data import check_split, get_spec, load_split, normalize, stratified_indices
from .data.splits import input_side
from .progress import progress_bar


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: str = "cifar10", n: int | None = 2000, *,
             batch_size: int = 128, device: str | torch.device = "cpu",
             resolution: int | None = None, split: str | None = None,
             progress: bool = False) -> dict:
    """Accuracy in percent on ``n`` images of the evaluation split: {'top1', 'top5' (more than
    10 classes), 'n', 'split', 'subset', 'seconds', 'images_per_s'}.

    ``n=None`` (or n >= the split's size) evaluates the whole split and reports
    subset="full"; otherwise the fixed class-stratified subset of ``stratified_indices``
    (seed 0) and subset="stratified". The model is put in eval mode and on ``device``.

    Raises weights.CheckpointError (a ValueError) before any image is read when the model
    cannot fit the data set (``weights.check_weights_fit``: NaN/Inf weights, another class
    count, weights trained on other labels or at another resolution): a silent 10% is not a
    result. ValueError for a batch_size that is not an int >= 1, an unknown data set or a
    ``split`` not among its ``splits``; AssetMissingError when the split's files are not under
    the asset root. ``seconds`` times the forward passes only (s), not loading or decoding the
    split; ``resolution`` is the input side in px (None: the data set's default)."""
    from .weights import check_weights_fit

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    spec = get_spec(dataset)
    if split is not None:
        check_split(dataset, split)
    side = input_side(dataset, resolution)  # 0 read as "trained at 0 px" before
    check_weights_fit(model, dataset, spec.num_classes, side)
    images, labels = load_split(dataset, split or spec.splits[1], resolution)
    idx = torch.from_numpy(stratified_indices(labels, n))
    model = model.to(device).eval()
    correct1 = correct5 = 0
    bar = progress_bar(len(idx), f"eval {dataset}", enabled=progress, unit="img")
    start = time.perf_counter()
    for chunk in torch.split(idx, batch_size):
        x = normalize(images[chunk].to(device), dataset)
        y = labels[chunk].to(device)
        logits = model(x)
        correct1 += int((logits.argmax(1) == y).sum())
        if spec.num_classes > 10:
            top5 = logits.topk(5, dim=1).indices
            correct5 += int((top5 == y[:, None]).any(1).sum())
        bar.update(len(chunk))
    seconds = time.perf_counter() - start
    out = {"top1": 100.0 * correct1 / len(idx), "n": len(idx),
           "split": split or spec.splits[1],
           "subset": "full" if len(idx) == len(labels) else "stratified", "seconds": seconds,
           "images_per_s": len(idx) / seconds if seconds > 0 else float("inf")}
    if spec.num_classes > 10:
        out["top5"] = 100.0 * correct5 / len(idx)
    return out


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_seconds(model: nn.Module, images: torch.Tensor, chunk_size: int = 256) -> float:
    """Wall time of one forward pass of ``model`` (as it is: mode and device unchanged) over
    ``images`` in chunks: the reference the repair engine's cost is measured against."""
    device = images.device
    synchronize(device)
    start = time.perf_counter()
    for chunk in torch.split(images, chunk_size):
        model(chunk)
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- label-free scores
# Scores of a pruned (and repaired) model against its dense parent on unlabeled images: what
# ``sparse_repair.select`` chooses by and what run rows record when RunConfig.scoring > 0. No
# label is read here: the dense model's own predictions are the reference.

@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256
                   ) -> torch.Tensor:
    """The model's logits on ``images`` (float [N, C, H, W], already normalized, on the model's
    device), in eval mode: float32 [N, num_classes] on the CPU. The model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        out = [model(chunk).float().cpu() for chunk in torch.split(images, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def label_free_scores(logits: torch.Tensor, dense_logits: torch.Tensor, per_image: bool = False
                      ) -> dict:
    """How closely a pruned model follows its dense parent on the same images, without labels.

    Args:
        logits, dense_logits: float [N, K], the pruned and the dense model's logits on the same
            N images in the same order (``predict_logits``).
    Returns:
        {"agreement": percent of images whose top-1 class equals the dense model's (0-100,
        higher is better), "kl": mean over images of KL(p_dense || p_pruned) in nats (lower
        is better; the distillation objective of Hinton et al. 2015, so a pruned model
        scores well only where it reproduces the dense model's full softmax, not just its
        argmax)}. Computed in float64. The KL is >= 0 in exact arithmetic; for (near-)
        identical logits rounding can leave a per-image KL slightly below 0 (of order -1e-16
        for float64 logits perturbed by 1e-15; identical logits give exactly 0). It
        is reported as computed, not clamped, so no real difference is hidden; compare KLs
        with a tolerance of ~1e-12. With ``per_image=True`` also "per_image": {"agreement":
        float64 [N] of 0.0 or 100.0, "kl": float64 [N] in nats}, the values whose means these
        are (``select`` pairs them to tell whether its choice beats the runner-up).
    Raises:
        TypeError: a logits argument is not a floating-point tensor.
        ValueError: shapes differ, are not [N, K] with N, K >= 1, the tensors are on the meta
            device or on two devices, a logit is NaN/Inf, or float64 logits so far apart that
            the KL overflows float64 (a collapsed model is scored as such by the caller, never
            as NaN).
    The result carries no autograd graph: tensors that require grad are detached.
    """
    if not (isinstance(logits, torch.Tensor) and isinstance(dense_logits, torch.Tensor)):
        raise TypeError(f"logits must be torch tensors [N, K] (predict_logits), got "
                        f"{type(logits).__name__} and {type(dense_logits).__name__}")
    if not isinstance(per_image, bool):
        raise TypeError(f"per_image must be True or False, got {per_image!r}")
    if not (logits.is_floating_point() and dense_logits.is_floating_point()):
        raise TypeError(f"logits must be floating-point tensors (predict_logits gives float32), "
                        f"got {logits.dtype} and {dense_logits.dtype}; integer logits are usually "
                        f"class indices, which carry no softmax to compare")
    if (logits.shape != dense_logits.shape or logits.dim() != 2 or logits.shape[0] == 0
            or logits.shape[1] == 0):
        raise ValueError(f"logits must be two [N, K] tensors of the same shape with N >= 1 and "
                         f"K >= 1, got {tuple(logits.shape)} and {tuple(dense_logits.shape)}")
    if "meta" in (logits.device.type, dense_logits.device.type):
        raise ValueError("logits are on the meta device, which holds no values; compute them on "
                         "a real device (predict_logits gives CPU tensors)")
    if logits.device != dense_logits.device:
        raise ValueError(f"logits are on {logits.device} and dense_logits on "
                         f"{dense_logits.device}; move both to one device (predict_logits "
                         f"gives CPU tensors)")
    logits, dense_logits = logits.detach(), dense_logits.detach()
    for name, t in (("logits", logits), ("dense_logits", dense_logits)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or Inf; the model's forward pass is not finite "
                             f"on these images (check its weights with torch.isfinite)")
    logp = torch.log_softmax(logits.double(), dim=1)
    logq = torch.log_softmax(dense_logits.double(), dim=1)
    kl_each = (logq.exp() * (logq - logp)).sum(1)
    if not torch.isfinite(kl_each).all():
        # only float64 logits ~1e308 apart get here: a softmax entry underflows to 0, so its
        # log is -inf and the sum is 0 * -inf (NaN) or a KL beyond float64 (Inf)
        raise ValueError("the KL of these logits overflows float64: some logits differ by more "
                         "than ~1e308, so a softmax entry is exactly 0; such a model's outputs "
                         "are not usable (check its weights and inputs)")
    same = logits.argmax(1) == dense_logits.argmax(1)
    # count * 100 / n, not mean * 100: 472 of 1,000 is 47.2, not 47.199999999999996
    out = {"agreement": int(same.sum()) * 100.0 / logits.shape[0], "kl": float(kl_each.mean())}
    if per_image:
        out["per_image"] = {"agreement": same.double().cpu() * 100.0, "kl": kl_each.cpu()}
    return out
