"""Data for the trainer: ImageFolder or synthetic images, sharded over ranks, resumable mid-epoch.

Exact resumption rests on two choices made here:

* **Order**: :class:`ResumableDistributedSampler` is a ``DistributedSampler``
  (shuffle by ``seed + epoch``, ``drop_last``) that can start part-way into an
  epoch. Rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of the epoch's
  permutation, so the global batch ``k`` (the local batches ``k`` of all ranks)
  is positions ``[k·B, (k+1)·B)`` of the permutation whatever ``W`` is: one
  process and ``W`` processes with the same global batch ``B`` see the same
  images in the same steps.
* **Augmentation**: :class:`SeededAugmentation` draws each sample's random
  crop and flip from a seed of ``(seed, epoch, index)``, not from a process's
  running RNG, so the images do not depend on the number of loader workers, on
  which worker loads them, or on where a run was interrupted.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Sampler

from . import SetupError

Tensor = torch.Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's reference evaluation: resize the short side to 256 for a 224 crop (crop fraction 0.875).
VAL_CROP_FRACTION = 224 / 256


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader workers ignore SIGTERM.

    A scheduler that preempts a job (SLURM, Kubernetes) signals every process
    of it; a worker that died of the signal would make the trainer's next
    batch fail before it could write its checkpoint. The trainer's main process
    handles SIGTERM and shuts its workers down itself (they also exit when it does).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SampleKey(NamedTuple):
    """What the training sampler hands the data set: which sample, in which epoch (seeds its augmentation)."""
    index: int
    epoch: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation, distinct for each ``(seed, epoch, index)``."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (1 << 63)


class SeededAugmentation(Dataset):
    """``dataset[SampleKey(index, epoch)] -> (transform(image), label)`` with seeded randomness.

    ``base[index]`` gives ``(image, label)``; the transform's random draws
    (torchvision transforms use torch's global CPU generator) come from a
    generator seeded by :func:`sample_seed`, inside ``fork_rng`` so the
    process's own RNG stream is left untouched.
    """

    def __init__(self, base: Dataset, transform: Optional[Callable], seed: int):
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey) -> Tuple[Tensor, int]:
        index, epoch = key
        image, label = self.base[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                image = self.transform(image)
        return image, label


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True, drop_last=True)`` that yields :class:`SampleKey` and starts anywhere.

    ``set_position(epoch, start)`` skips the first ``start`` samples of this
    rank's share of ``epoch`` (``start`` = local batches done × local batch size).
    Each rank gets ``len(dataset) // world_size`` samples per epoch.
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside this rank's {self.num_samples} samples")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())[self.start:]
        return iter([SampleKey(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices ``rank, rank + W, rank + 2W, ...``: disjoint shards that cover the data set exactly once.

    For validation: unlike ``DistributedSampler`` it pads nothing, so summed
    counts over ranks are exact top-1/top-5 over the whole set.
    """

    def __init__(self, length: int, world_size: int, rank: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SyntheticImages(Dataset):
    """Random images whose label can be learnt from them: a smooth per-class pattern plus noise.

    ``dataset[i] -> (image (3, size, size) float32, label)``, the same for the
    same ``(seed, i)`` in every process. Each class has a fixed 4×4 random
    pattern (upsampled bilinearly to ``size``) that is added to unit Gaussian
    noise, so a network can beat chance on it within a few hundred images, while
    a throughput run costs one ``randn`` per image. Images are already
    normalised (zero mean, about unit variance), so no normalisation follows.
    """

    PATTERN_SIZE = 4

    SPLITS = ("train", "val")

    def __init__(self, length: int, num_classes: int, image_size: int, seed: int, split: str = "train",
                 signal: float = 1.0):
        if length < 1 or num_classes < 1 or image_size < 1:
            raise SetupError(f"synthetic data needs positive sizes, got length={length}, "
                             f"num_classes={num_classes}, image_size={image_size}")
        self.length = length
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.signal = signal
        # Same class patterns for both splits (they come from `seed`); other noise (a split-specific stream).
        self._noise_stream = -1 - self.SPLITS.index(split)
        generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, self.PATTERN_SIZE, self.PATTERN_SIZE, generator=generator)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self._noise_stream, index))
        label = int(torch.randint(self.num_classes, (1,), generator=generator))
        noise = torch.randn(3, self.image_size, self.image_size, generator=generator)
        pattern = F.interpolate(self.patterns[label:label + 1], size=(self.image_size, self.image_size),
                                mode="bilinear", align_corners=False)[0]
        return pattern * self.signal + noise, label


@dataclass
class DataSets:
    """The trainer's two data sets; ``train`` is indexed by :class:`SampleKey`, ``val`` by int."""
    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def _train_transform(image_size: int, crop_scale_min: float, hflip: float, mean: Sequence[float],
                     std: Sequence[float]):
    from torchvision import transforms
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0)),
        transforms.RandomHorizontalFlip(hflip),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _val_transform(image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def check_image_folder_root(root: str) -> None:
    """Raise :class:`SetupError` unless ``root/train`` and ``root/val`` are directories."""
    if not os.path.isdir(root):
        raise SetupError(f"--data {root}: no such directory (expected an ImageFolder root with train/ and val/)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise SetupError(f"--data {root}: no {split}/ subfolder (expected {root}/{split}/<class>/<image>)")


def _image_folder(split_dir: str, transform):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(split_dir, transform=transform)
    except FileNotFoundError as exc:  # no class folder, or a class folder without a single image
        raise SetupError(f"--data: {split_dir}: {exc}") from None


def image_folder_datasets(root: str, image_size: int, val_resize: int, crop_scale_min: float, hflip: float,
                          mean: Sequence[float], std: Sequence[float], seed: int) -> DataSets:
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` with the paper's augmentation.

    Train: RandomResizedCrop(``image_size``, scale ``(crop_scale_min, 1)``),
    horizontal flip with probability ``hflip``, ``ToTensor``, normalisation.
    Val: resize the short side to ``val_resize``, centre crop ``image_size``,
    ``ToTensor``, normalisation. Raises :class:`SetupError` for a missing
    folder, a class folder without images, or train/val class lists that differ.
    """
    check_image_folder_root(root)
    train = _image_folder(os.path.join(root, "train"), transform=None)
    val = _image_folder(os.path.join(root, "val"), transform=_val_transform(image_size, val_resize, mean, std))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise SetupError(f"--data {root}: train/ and val/ have different class folders "
                         f"(only in train: {only_train}, only in val: {only_val})")
    augmented = SeededAugmentation(train, _train_transform(image_size, crop_scale_min, hflip, mean, std), seed)
    return DataSets(augmented, val, len(train.classes),
                    f"ImageFolder {root} ({len(train)} train / {len(val)} val images, {len(train.classes)} classes)")


def synthetic_datasets(train_size: int, val_size: int, num_classes: int, image_size: int, hflip: float,
                       seed: int) -> DataSets:
    """:class:`SyntheticImages` train and val sets (same class patterns, other noise); the training set with a
    seeded horizontal flip."""
    from torchvision import transforms
    train = SyntheticImages(train_size, num_classes, image_size, seed, split="train")
    val = SyntheticImages(val_size, num_classes, image_size, seed, split="val")
    flip = transforms.RandomHorizontalFlip(hflip) if hflip > 0 else None
    return DataSets(SeededAugmentation(train, flip, seed), val, num_classes,
                    f"synthetic ({train_size} train / {val_size} val images of {image_size}x{image_size}, "
                    f"{num_classes} classes)")
