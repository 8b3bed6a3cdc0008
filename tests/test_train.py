"""Training augmentation: CIFAR-like random crops are per image (torchvision's RandomCrop with
padding, applied to each image independently), vectorised and fixed by the seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_repair.train import _augment, _pad_crop

PAD = 4  # CIFAR: 32 px, pad 32 / 8


def _image(side: int = 32, seed: int = 0) -> torch.Tensor:
    """A random uint8 [3, side, side] image: all its padded windows differ from each other
    and from their mirror images, so a crop identifies its offset (and flip) uniquely."""
    return torch.randint(0, 256, (3, side, side), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _offsets(out: torch.Tensor, img: torch.Tensor, pad: int, flips: bool = False) -> list:
    """For each image of ``out`` [n, C, h, w], the (dy, dx, flipped) of the window of the
    zero-padded ``img`` it equals; fails if it equals none (or more than one)."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad, pad, pad, pad))
    windows = {(dy, dx, False): padded[:, dy:dy + h, dx:dx + w]
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}
    if flips:
        windows |= {(dy, dx, True): win.flip(2) for (dy, dx, _), win in windows.items()}
    keys = list(windows)
    stacked = torch.stack([windows[k] for k in keys])                      # [K, C, h, w]
    match = (out[:, None] == stacked[None]).flatten(2).all(2)              # [n, K]
    for i, hits in enumerate(match.sum(1).tolist()):
        assert hits == 1, f"image {i} is not exactly one {h}x{w} window of the padded input"
    found = [keys[k] for k in match.int().argmax(1).tolist()]
    return found


def test_pad_crop_draws_an_offset_per_image():
    img = _image()
    batch = img.expand(64, -1, -1, -1).contiguous()  # identical images: only offsets differ
    out = _pad_crop(batch, PAD, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not all(torch.equal(out[0], o) for o in out[1:]), "one offset for the whole batch"
    offsets = _offsets(out, img, PAD)
    # 64 draws from 81 offsets: about 44 distinct expected; one shared offset would give 1.
    assert len(set(offsets)) >= 20, f"only {len(set(offsets))} distinct offsets in 64 images"


def test_augment_cifar_crops_and_flips_each_image_and_is_seeded():
    img = _image()
    batch = img.expand(64, -1, -1, -1).contiguous()
    a = _augment(batch, "cifar10", torch.Generator().manual_seed(7))
    b = _augment(batch, "cifar10", torch.Generator().manual_seed(7))
    c = _augment(batch, "cifar10", torch.Generator().manual_seed(8))
    assert a.shape == batch.shape and a.dtype == torch.uint8
    assert torch.equal(a, b), "the same seed must give the same crops and flips"
    assert not torch.equal(a, c), "another seed must give other crops"
    found = _offsets(a, img, PAD, flips=True)
    assert len({(dy, dx) for dy, dx, _ in found}) >= 20
    assert {f for _, _, f in found} == {False, True}, "flips are drawn per image"


@pytest.mark.parametrize("dataset", ["imagenette", "imagenet100"])
def test_imagenet_style_data_sets_get_random_resized_crop_not_pad_crop(dataset):
    """imagenet100 fell to the CIFAR pad-crop branch; both folder sets take the same draws."""
    img = _image()
    batch = img.expand(16, -1, -1, -1).contiguous()
    out = _augment(batch, dataset, torch.Generator().manual_seed(7))
    ref = _augment(batch, "imagenette", torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)
    padded = _augment(batch, "cifar10", torch.Generator().manual_seed(7))
    assert not torch.equal(out, padded)


def test_pad_crop_on_digits_pads_one_pixel():
    img = _image(side=8, seed=3)
    out = _pad_crop(img.expand(32, -1, -1, -1), 1, torch.Generator().manual_seed(0))
    assert len(set(_offsets(out, img, 1))) > 1


@pytest.mark.gpu
def test_pad_crop_on_cuda_matches_cpu():
    """The draws come from the CPU generator, so a CUDA batch gets the CPU batch's crops."""
    batch = torch.stack([_image(seed=s) for s in range(16)])
    cpu = _pad_crop(batch, PAD, torch.Generator().manual_seed(2))
    gpu = _pad_crop(batch.cuda(), PAD, torch.Generator().manual_seed(2))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
