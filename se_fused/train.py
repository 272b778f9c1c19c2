"""``python -m se_fused.train``: (SE-)ResNet-50 with the SE paper's recipe, on torch.distributed.

One process per GPU under ``torchrun`` (DistributedDataParallel over NCCL), or
one process on its own; gloo serves CPU runs. The defaults are the recipe of
Hu et al. (SE-Nets) for ImageNet: SGD with momentum 0.9 and weight decay 1e-4,
learning rate 0.6 for a global batch of 1024 (scaled linearly with the batch),
divided by 10 every 30 epochs, 100 epochs, RandomResizedCrop 224 and
horizontal flips, per-channel mean/std normalisation. Every one is a flag;
``python -m se_fused.train --help`` lists them, docs/training.md shows runs.

Outputs in ``--output-dir``: ``checkpoint-last.pt`` / ``checkpoint-prev.pt``
(every epoch, on ``--max-steps`` and on SIGTERM; see
:mod:`se_fused.training.checkpoint`), ``log.jsonl`` (one JSON object per
epoch: loss, top-1/top-5, images/s, learning rate) and ``config.json``.

``--resume`` continues a run exactly where it stopped, mid-epoch included:
model, optimizer, scheduler, position (epoch, step within it), RNG states
and partial epoch statistics come back, and the data order and augmentation
are functions of (seed, epoch, sample) (:mod:`se_fused.training.data`), so on
a CPU a resumed run ends bitwise where an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .backends import BACKEND_NAMES, resolve_backend
from .training import SetupError
from .training.checkpoint import (CheckpointError, capture_rng_state, check_same_run, find_resume_checkpoint,
                                  load_checkpoint, restore_rng_state, save_checkpoint)
from .training.data import (IMAGENET_MEAN, IMAGENET_STD, VAL_CROP_FRACTION, DataSets, ResumableDistributedSampler,
                            ShardSampler, ignore_sigterm, image_folder_datasets, synthetic_datasets)
from .training.distributed import (DEVICE_CHOICES, DIST_BACKEND_CHOICES, DistributedContext, LaunchEnv,
                                   convert_sync_batchnorm, init_distributed, read_launch_env, resolve_device,
                                   resolve_dist_backend, shutdown_distributed)
from .training.models import ARCHITECTURES, build_model, has_se

Tensor = torch.Tensor

EXIT_SETUP_ERROR = 2
EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
# With several ranks a SIGTERM is acted on when all agree (a collective), checked every this many steps.
TERMINATION_POLL_STEPS = 10
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``python -m se_fused.train`` argument parser (defaults: the SE paper's ImageNet recipe)."""
    parser = argparse.ArgumentParser(
        prog="python -m se_fused.train",
        description="Train (SE-)ResNet-50 with the SE paper's recipe; one process per GPU under torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="ImageFolder root with train/<class>/* and val/<class>/*")
    source.add_argument("--synthetic", action="store_true",
                        help="random images whose class can be learnt from them (smoke tests, speed runs)")
    data.add_argument("--synthetic-train-size", type=int, default=12800, help="images per synthetic epoch")
    data.add_argument("--synthetic-val-size", type=int, default=1280, help="synthetic validation images")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classes (default: 1000 for --synthetic, the class folders for --data)")
    data.add_argument("--image-size", type=int, default=224, help="training and validation crop size")
    data.add_argument("--val-resize", type=int, default=None,
                      help="validation short-side resize before the centre crop (default: image-size / 0.875)")
    data.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop's smallest area")
    data.add_argument("--hflip", type=float, default=0.5, help="horizontal-flip probability")
    data.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="per-channel normalisation mean")
    data.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="per-channel normalisation std")
    data.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (0: in-process)")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHITECTURES, default="se_resnet50",
                      help="network; *_tiny are small versions for tests and CPU smoke runs")
    model.add_argument("--se", choices=("fused", "eager"), default="fused",
                       help="SE block implementation of SE networks")
    model.add_argument("--se-backend", choices=("auto",) + BACKEND_NAMES, default="auto",
                       help="backend of the fused SE blocks")
    model.add_argument("--zero-init-last", action="store_true", help="zero each bottleneck's last BN scale")
    model.add_argument("--sync-bn", action="store_true",
                       help="batch-norm statistics over the global batch (all ranks) instead of each rank's")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=100)
    optim.add_argument("--batch-size", type=int, default=1024, help="global batch (all ranks together)")
    optim.add_argument("--lr", type=float, default=0.6, help="learning rate for a global batch of --lr-batch")
    optim.add_argument("--lr-batch", type=int, default=1024,
                       help="the batch --lr is given for; the rate used is lr * batch-size / lr-batch")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument("--lr-step-epochs", type=int, default=30, help="multiply the rate by --lr-decay this often")
    optim.add_argument("--lr-decay", type=float, default=0.1)
    optim.add_argument("--warmup-epochs", type=float, default=0.0,
                       help="linear warm-up from 0 over this many epochs (the paper uses none)")
    optim.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda:LOCAL_RANK if a GPU")
    system.add_argument("--dist-backend", choices=DIST_BACKEND_CHOICES, default="auto",
                        help="auto: nccl on GPUs, gloo on CPUs")
    system.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch's intra-op pool for this run (default: torch's choice)")
    system.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for GPUs, off for CPUs)")
    system.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last activations and weights (default: on for GPUs, off for CPUs)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=os.path.join("runs", "train"),
                     help="checkpoints, log.jsonl and config.json")
    run.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                     help="continue a run: a checkpoint file, or without a value the newest in --output-dir "
                          "(a fresh start when there is none)")
    run.add_argument("--max-steps", type=int, default=None,
                     help="stop (with a checkpoint) once this many optimizer steps are done in total")
    run.add_argument("--no-val", action="store_true", help="skip the validation after each epoch")
    run.add_argument("--progress", choices=("tqdm", "print", "none"), default="tqdm",
                     help="rank 0's progress display (tqdm falls back to print when not installed)")
    run.add_argument("--print-freq", type=int, default=50, help="steps between loss updates of the display")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` by default)."""
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace, env: LaunchEnv) -> None:
    """Raise :class:`SetupError` for settings no run can use (before any process group or data is touched)."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--lr-batch": args.lr_batch,
                "--image-size": args.image_size, "--lr-step-epochs": args.lr_step_epochs,
                "--print-freq": args.print_freq}
    for flag, value in positive.items():
        if value < 1:
            raise SetupError(f"{flag} must be at least 1, got {value}")
    if args.batch_size % env.world_size:
        raise SetupError(f"--batch-size {args.batch_size} (the global batch) is not divisible by the world size "
                         f"{env.world_size}; every rank must get the same local batch")
    if args.max_steps is not None and args.max_steps < 1:
        raise SetupError(f"--max-steps must be at least 1, got {args.max_steps}")
    if not args.lr > 0 or args.weight_decay < 0 or not 0 <= args.momentum < 1 or not args.lr_decay > 0:
        raise SetupError("need --lr > 0, --weight-decay >= 0, 0 <= --momentum < 1 and --lr-decay > 0")
    if args.warmup_epochs < 0 or args.workers < 0:
        raise SetupError("--warmup-epochs and --workers must not be negative")
    if not 0 < args.crop_scale_min <= 1 or not 0 <= args.hflip <= 1:
        raise SetupError("need 0 < --crop-scale-min <= 1 and 0 <= --hflip <= 1")
    if any(value <= 0 for value in args.std):
        raise SetupError(f"--std must be positive, got {args.std}")
    if args.threads is not None and args.threads < 1:
        raise SetupError(f"--threads must be at least 1, got {args.threads}")
    if args.num_classes is not None and args.num_classes < 1:
        raise SetupError(f"--num-classes must be at least 1, got {args.num_classes}")


def check_se_backend(args: argparse.Namespace, device: torch.device) -> None:
    """Raise :class:`SetupError` when the fused SE blocks' backend cannot compute on ``device``."""
    if not has_se(args.arch) or args.se != "fused":
        return
    try:
        resolve_backend(args.se_backend, device)
    except (RuntimeError, ValueError) as exc:
        raise SetupError(f"--se-backend {args.se_backend} on {device}: {exc}") from None


def build_datasets(args: argparse.Namespace) -> DataSets:
    """The data sets the flags describe (:class:`SetupError` for missing or malformed data)."""
    if args.synthetic:
        return synthetic_datasets(args.synthetic_train_size, args.synthetic_val_size, args.num_classes or 1000,
                                  args.image_size, args.hflip, args.seed)
    val_resize = args.val_resize or int(round(args.image_size / VAL_CROP_FRACTION))
    data = image_folder_datasets(args.data, args.image_size, val_resize, args.crop_scale_min, args.hflip,
                                 args.mean, args.std, args.seed)
    if args.num_classes is not None and args.num_classes != data.num_classes:
        raise SetupError(f"--num-classes {args.num_classes}, but {args.data}/train has {data.num_classes} "
                         "class folders")
    return data


def scaled_lr(args: argparse.Namespace) -> float:
    """The linear scaling rule: ``lr · batch_size / lr_batch`` (0.6 at 1024 → 0.15 at 256)."""
    return args.lr * args.batch_size / args.lr_batch


class StepDecaySchedule:
    """Learning-rate factor of optimizer step ``i`` (0-based), for ``LambdaLR``.

    ``decay ** (epoch // step_epochs)`` with ``epoch = i // steps_per_epoch``,
    times ``(i + 1) / warmup_steps`` during a linear warm-up.
    """

    def __init__(self, steps_per_epoch: int, step_epochs: int, decay: float, warmup_steps: int = 0):
        self.steps_per_epoch = steps_per_epoch
        self.step_epochs = step_epochs
        self.decay = decay
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        factor = self.decay ** ((step // self.steps_per_epoch) // self.step_epochs)
        if step < self.warmup_steps:
            factor *= (step + 1) / self.warmup_steps
        return factor


def run_identity(args: argparse.Namespace, data: DataSets) -> Dict[str, Any]:
    """The settings a checkpoint must share with the run resuming it (model, data, order, schedule)."""
    return {"arch": args.arch, "se": args.se if has_se(args.arch) else None, "num_classes": data.num_classes,
            "train_images": len(data.train), "batch_size": args.batch_size, "seed": args.seed,
            "lr": scaled_lr(args), "momentum": args.momentum, "weight_decay": args.weight_decay,
            "lr_step_epochs": args.lr_step_epochs, "lr_decay": args.lr_decay,
            "warmup_epochs": args.warmup_epochs}


def resolve_resume(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume from, or ``None`` for a fresh start (which must not overwrite one)."""
    if args.resume is None:
        existing = find_resume_checkpoint(args.output_dir)
        if existing is not None:
            raise SetupError(f"--output-dir {args.output_dir} already holds {existing}; pass --resume to "
                             "continue that run, or choose another --output-dir")
        return None
    if args.resume == "auto":
        return find_resume_checkpoint(args.output_dir)
    return args.resume


# ---------------------------------------------------------------------------------------------------------------
# Training loop pieces
# ---------------------------------------------------------------------------------------------------------------

class TerminationRequest:
    """Context manager: SIGTERM sets :attr:`requested` instead of killing the process (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print("se_fused.train: SIGTERM received; stopping at the next step boundary with a checkpoint",
                  file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> "TerminationRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Progress:
    """Rank 0's progress display for one epoch: a tqdm bar, printed lines, or nothing."""

    def __init__(self, mode: str, enabled: bool, epoch: int, total: int, initial: int, print_freq: int):
        self.epoch, self.total, self.step, self.print_freq = epoch, total, initial, print_freq
        self.mode = mode if enabled else "none"
        self.bar = None
        if self.mode == "tqdm":
            try:
                from tqdm import tqdm
            except ImportError:
                self.mode = "print"
            else:
                self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}", dynamic_ncols=True,
                                leave=False)

    def wants_loss(self) -> bool:
        """Whether this step's loss will be shown (reading it costs a device synchronisation)."""
        return self.mode != "none" and ((self.step + 1) % self.print_freq == 0 or self.step + 1 == self.total)

    def update(self, loss: Optional[float], lr: float, images_per_s: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.0f}")
        elif self.mode == "print" and loss is not None:
            print(f"epoch {self.epoch + 1} step {self.step}/{self.total} loss {loss:.4f} lr {lr:.4g} "
                  f"{images_per_s:.0f} images/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochMeters:
    """Running sums of one epoch on this rank: ``[loss · images, top-1 correct]`` on the device (read only at
    the epoch's end: no synchronisation per step), the image count and the seconds spent training."""

    def __init__(self, device: torch.device, totals: Optional[List[float]] = None, seconds: float = 0.0):
        totals = totals or [0.0, 0.0, 0.0]
        self.sums = torch.tensor(totals[:2], dtype=torch.float64, device=device)
        self.images = totals[2]
        self.seconds = seconds

    @property
    def totals(self) -> Tensor:
        """``[loss · images, top-1 correct, images]`` (float64, on the device)."""
        return torch.cat([self.sums, self.sums.new_tensor([self.images])])

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        count = labels.numel()
        correct = (logits.argmax(dim=1) == labels).sum()
        self.sums += torch.stack([loss.double() * count, correct.double()])
        self.images += count


def top_k_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """How many rows of ``logits (N, classes)`` have ``labels (N,)`` among their ``k`` largest entries."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).sum()


def _to_device(images: Tensor, labels: Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def evaluate(model: nn.Module, loader: DataLoader, ctx: DistributedContext, amp: bool,
             channels_last: bool) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy of ``model`` (unwrapped) over the whole validation set, all ranks together.

    Every rank first takes rank 0's BN running statistics (the ones the checkpoint holds).
    """
    ctx.broadcast_buffers(model)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, top-1 and top-5 correct
    count = 0
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
        for images, labels in loader:
            images, labels = _to_device(images, labels, ctx.device, channels_last)
            logits = model(images).float()
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 top_k_correct(logits, labels, 1).double(),
                                 top_k_correct(logits, labels, 5).double()])
            count += labels.numel()
    model.train()
    loss_sum, top1, top5, count = ctx.all_reduce_sum(torch.cat([sums, sums.new_tensor([count])])).tolist()
    count = max(count, 1.0)
    return {"val_loss": loss_sum / count, "val_top1": top1 / count, "val_top5": top5 / count}


def _write_text_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def write_log(output_dir: str, history: List[Dict[str, Any]]) -> None:
    """``log.jsonl``: one JSON object per finished epoch (rewritten whole, so it always matches the checkpoint)."""
    _write_text_atomically(os.path.join(output_dir, LOG_NAME), "".join(json.dumps(r) + "\n" for r in history))


@dataclass
class TrainResult:
    """What :func:`train` ends with (rank-local; ``model`` is the unwrapped network)."""
    model: nn.Module
    history: List[Dict[str, Any]]
    epoch: int  # epochs finished
    step_in_epoch: int  # steps done in the unfinished epoch
    global_step: int
    stopped: Optional[str]  # None: all epochs done; "max_steps"; "sigterm"
    output_dir: str


@dataclass
class _State:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    last_lr: float = 0.0


class Trainer:
    """One rank's training run (built by :func:`train` after every setting has been checked)."""

    def __init__(self, args: argparse.Namespace, ctx: DistributedContext, data: DataSets,
                 checkpoint: Optional[Dict[str, Any]], checkpoint_path: Optional[str]):
        self.args, self.ctx, self.data = args, ctx, data
        device = ctx.device
        self.amp = device.type == "cuda" if args.amp is None else args.amp
        self.channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
        self.local_batch = args.batch_size // ctx.world_size
        self.steps_per_epoch = len(data.train) // args.batch_size
        self.identity = run_identity(args, data)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        random.seed(args.seed)
        torch.manual_seed(args.seed)
        try:
            import numpy
            numpy.random.seed(args.seed)
        except ImportError:
            pass
        model = build_model(args.arch, data.num_classes, args.se, args.se_backend, args.zero_init_last)
        if args.sync_bn:
            model = convert_sync_batchnorm(model, device)
        self.model = model.to(device, memory_format=torch.channels_last if self.channels_last
                              else torch.preserve_format)
        self.network = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda"
                                                else None, gradient_as_bucket_view=True)
                        if ctx.distributed else self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=scaled_lr(args), momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        warmup_steps = int(round(args.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, StepDecaySchedule(self.steps_per_epoch, args.lr_step_epochs, args.lr_decay,
                                              warmup_steps))
        self.state = _State(last_lr=self.optimizer.param_groups[0]["lr"])
        self.history: List[Dict[str, Any]] = []
        self.meters = EpochMeters(device)
        if checkpoint is not None:
            self._restore(checkpoint, checkpoint_path)

        self.sampler = ResumableDistributedSampler(data.train, ctx.world_size, ctx.rank, args.seed)
        # The loaders draw their workers' base seeds from their own generator, not from the global RNG, whose
        # stream then depends on nothing but the training itself (augmentation is seeded per sample anyway).
        loader_options = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                              persistent_workers=args.workers > 0, worker_init_fn=ignore_sigterm,
                              generator=torch.Generator().manual_seed(args.seed))
        self.train_loader = DataLoader(data.train, batch_size=self.local_batch, sampler=self.sampler,
                                       drop_last=True, **loader_options)
        self.val_loader = DataLoader(data.val, batch_size=self.local_batch,
                                     sampler=ShardSampler(len(data.val), ctx.world_size, ctx.rank),
                                     **loader_options)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _restore(self, checkpoint: Dict[str, Any], path: str) -> None:
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.state = _State(checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"],
                            self.optimizer.param_groups[0]["lr"])
        self.history = list(checkpoint["history"])
        meters = checkpoint["meters"]
        # The saved partial sums are over all ranks already: rank 0 carries them, the others start from zero.
        self.meters = EpochMeters(self.ctx.device, list(meters["totals"]) if self.ctx.is_main else None,
                                  meters["seconds"])
        rng = checkpoint["rng"]
        restore_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else rng[0], self.ctx.device)

    def save(self) -> None:
        """Checkpoint the current position (a collective: every rank calls it; rank 0 writes)."""
        rng_states = self.ctx.gather_objects(capture_rng_state(self.ctx.device))
        partial_totals = self.ctx.all_reduce_sum(self.meters.totals).tolist()
        if self.ctx.is_main:
            save_checkpoint({
                "run": self.identity, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                "global_step": self.state.global_step, "rng": rng_states,
                "meters": {"totals": partial_totals, "seconds": self.meters.seconds},
                "history": self.history, "world_size": self.ctx.world_size, "args": vars(self.args),
            }, self.args.output_dir)
        self.ctx.barrier()

    # -- the loop ---------------------------------------------------------------------------------------------

    def _train_step(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = _to_device(images, labels, self.ctx.device, self.channels_last)
        self.state.last_lr = self.optimizer.param_groups[0]["lr"]
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.network(images)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        loss = loss.detach()
        self.meters.add(loss, logits.detach(), labels)
        return loss

    def _finish_epoch(self) -> Dict[str, Any]:
        loss_sum, correct, count = self.ctx.all_reduce_sum(self.meters.totals).tolist()
        record: Dict[str, Any] = {
            "epoch": self.state.epoch + 1, "global_step": self.state.global_step, "lr": self.state.last_lr,
            "train_loss": loss_sum / count, "train_top1": correct / count,
            "images_per_s": count / max(self.meters.seconds, 1e-9), "train_seconds": self.meters.seconds}
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training diverged: mean loss {record['train_loss']} in epoch "
                                     f"{self.state.epoch + 1}")
        if not self.args.no_val:
            record.update(evaluate(self.model, self.val_loader, self.ctx, self.amp, self.channels_last))
        self.history.append(record)
        if self.ctx.is_main:
            write_log(self.args.output_dir, self.history)
            shown = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in record.items())
            print(f"se_fused.train: {shown}", flush=True)
        return record

    def run(self) -> TrainResult:
        args, ctx, state = self.args, self.ctx, self.state
        stopped: Optional[str] = None
        with TerminationRequest() as termination:
            while state.epoch < args.epochs and stopped is None:
                if args.max_steps is not None and state.global_step >= args.max_steps:
                    stopped = "max_steps"
                    break
                self.sampler.set_position(state.epoch, state.step_in_epoch * self.local_batch)
                progress = Progress(args.progress, ctx.is_main, state.epoch, self.steps_per_epoch,
                                    state.step_in_epoch, args.print_freq)
                started, first_step = time.perf_counter(), state.step_in_epoch
                for images, labels in self.train_loader:
                    show = progress.wants_loss()
                    loss = self._train_step(images, labels)
                    state.step_in_epoch += 1
                    state.global_step += 1
                    if show:
                        loss_value = loss.item()
                        if not math.isfinite(loss_value):
                            raise FloatingPointError(f"training diverged: loss {loss_value} at step "
                                                     f"{state.global_step}")
                        images = (state.step_in_epoch - first_step) * args.batch_size
                        progress.update(loss_value, state.last_lr,
                                        images / max(time.perf_counter() - started, 1e-9))
                    else:
                        progress.update(None, state.last_lr, 0.0)
                    if args.max_steps is not None and state.global_step >= args.max_steps:
                        stopped = "max_steps"
                    elif (not ctx.distributed or state.global_step % TERMINATION_POLL_STEPS == 0) and \
                            ctx.any_rank(termination.requested):
                        stopped = "sigterm"
                    if stopped is not None:
                        break
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                self.meters.seconds += time.perf_counter() - started
                progress.close()
                if state.step_in_epoch == self.steps_per_epoch:
                    self._finish_epoch()
                    state.epoch += 1
                    state.step_in_epoch = 0
                    self.meters = EpochMeters(ctx.device)
                    self.save()
                    if stopped is None and ctx.any_rank(termination.requested):
                        stopped = "sigterm"
                else:  # stopped part-way into the epoch
                    self.save()
        if ctx.is_main and stopped is not None:
            print(f"se_fused.train: stopped ({stopped}) at epoch {state.epoch + 1} step {state.step_in_epoch}, "
                  f"global step {state.global_step}; continue with --resume", flush=True)
        return TrainResult(self.model, self.history, state.epoch, state.step_in_epoch, state.global_step, stopped,
                           args.output_dir)


def train(args: argparse.Namespace) -> TrainResult:
    """Run training as ``args`` (from :func:`parse_args`) say, on this process's rank.

    Every check that can fail without a GPU, the data or a process group is made
    first, so a bad setting raises :class:`~se_fused.training.SetupError`
    before anything is started or written.
    """
    env = read_launch_env()
    check_args(args, env)
    device = resolve_device(args.device, env.local_rank)
    dist_backend = resolve_dist_backend(args.dist_backend, device)
    check_se_backend(args, device)
    data = build_datasets(args)
    if len(data.train) < args.batch_size:
        raise SetupError(f"the training set has {len(data.train)} images, fewer than one global batch of "
                         f"{args.batch_size}")
    checkpoint_path = resolve_resume(args)
    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        check_same_run(checkpoint["run"], run_identity(args, data), checkpoint_path)

    ctx = None
    threads_before = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ctx = init_distributed(env, device, dist_backend)
        if ctx.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            _write_text_atomically(os.path.join(args.output_dir, CONFIG_NAME), json.dumps(
                {"args": vars(args), "world_size": ctx.world_size, "resumed_from": checkpoint_path}, indent=2))
        trainer = Trainer(args, ctx, data, checkpoint, checkpoint_path)
        if ctx.is_main:
            where = (f"resuming {checkpoint_path} at epoch {trainer.state.epoch + 1} step "
                     f"{trainer.state.step_in_epoch}" if checkpoint is not None else "from scratch")
            print(f"se_fused.train: {args.arch}{' (' + args.se + ' SE)' if has_se(args.arch) else ''}, "
                  f"{data.description}; {ctx.world_size} x {trainer.local_batch} = {args.batch_size} images per "
                  f"step, {trainer.steps_per_epoch} steps per epoch, lr {scaled_lr(args):.4g}; {device}, "
                  f"{ctx.backend if ctx.distributed else 'no process group'}, amp {trainer.amp}, "
                  f"channels_last {trainer.channels_last}; {where}", flush=True)
        return trainer.run()
    finally:
        shutdown_distributed(ctx)
        torch.set_num_threads(threads_before)


def main(argv: Optional[List[str]] = None) -> int:
    """The command: train, print setup errors without a traceback (status 2), 143 after a SIGTERM stop."""
    args = parse_args(argv)
    try:
        result = train(args)
    except SetupError as exc:
        print(f"se_fused.train: error: {exc}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    return EXIT_TERMINATED if result.stopped == "sigterm" else 0


if __name__ == "__main__":
    sys.exit(main())
