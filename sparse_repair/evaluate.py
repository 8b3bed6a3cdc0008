"""Top-1/top-5 accuracy on a fixed class-stratified subset (or the full split)."""

from __future__ import annotations

import time

import torch
from torch import nn

from .data import get_spec, load_split, normalize, stratified_indices
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
    (seed 0) and subset="stratified". The model is put in eval mode and on ``device``."""
    spec = get_spec(dataset)
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
