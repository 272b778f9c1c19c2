"""torch.distributed setup for the trainer: torchrun's environment, the device, the process group.

``torchrun --nproc_per_node=K -m se_fused.train ...`` starts K processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in each; a plain ``python -m se_fused.train`` has none of them and runs as a
single process (rank 0 of 1) without a process group.

Also here: :class:`CPUSyncBatchNorm`, batch norm over the global batch of all
ranks for CPU tensors (gloo), because ``torch.nn.SyncBatchNorm`` serves GPU
tensors only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import SetupError

Tensor = torch.Tensor

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DIST_BACKEND_CHOICES = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, from torchrun's environment variables."""
    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SetupError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_env() -> LaunchEnv:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (defaults 0/1/0: a single process without torchrun)."""
    env = LaunchEnv(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise SetupError(f"inconsistent launch environment RANK={env.rank} WORLD_SIZE={env.world_size} "
                         f"LOCAL_RANK={env.local_rank}")
    return env


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` or ``cpu``.

    ``"auto"`` takes the GPU when one is visible; ``"cuda"`` without a visible
    GPU (or with fewer GPUs than ``LOCAL_RANK`` needs) raises :class:`SetupError`.
    """
    if requested not in DEVICE_CHOICES:
        raise SetupError(f"--device must be one of {DEVICE_CHOICES}, got {requested!r}")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__} built with CUDA {torch.version.cuda}" if torch.version.cuda \
            else f"torch {torch.__version__} built without CUDA"
        raise SetupError(f"--device cuda: no CUDA GPU is visible to this process ({built}); "
                         "use --device cpu or run on a GPU machine")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SetupError(f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but only {count} GPU(s) are visible; "
                         f"start at most {count} processes per node")
    return torch.device("cuda", local_rank)


def resolve_dist_backend(requested: str, device: torch.device) -> str:
    """The process-group backend: NCCL for GPUs, gloo for CPUs (``"auto"``), or the one named if it can serve."""
    if requested not in DIST_BACKEND_CHOICES:
        raise SetupError(f"--dist-backend must be one of {DIST_BACKEND_CHOICES}, got {requested!r}")
    if requested == "auto":
        requested = "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl":
        if device.type != "cuda":
            raise SetupError(f"--dist-backend nccl needs CUDA GPUs, but this run trains on {device} "
                             f"(GPU visible: {torch.cuda.is_available()}); use --dist-backend gloo on CPUs")
        if not dist.is_nccl_available():
            raise SetupError("--dist-backend nccl: this torch build has no NCCL; use --dist-backend gloo")
    elif not dist.is_gloo_available():
        raise SetupError("--dist-backend gloo: this torch build has no gloo")
    return requested


@dataclass
class DistributedContext:
    """This process's rank, the job's size, its device and process-group backend."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum of ``values`` over all ranks (a new tensor; ``values`` itself is left alone)."""
        values = values.clone()
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank (a collective: every rank must call it)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_objects(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        gathered: List = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(env: LaunchEnv, device: torch.device, backend: str) -> DistributedContext:
    """Join the process group torchrun describes (``env://``); nothing to join for a single process."""
    if env.world_size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise SetupError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set; "
                             "start multi-process runs with torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(env.rank, env.world_size, env.local_rank, device, backend)


def shutdown_distributed(ctx: Optional[DistributedContext]) -> None:
    """Leave the process group (if this process joined one)."""
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Batch norm over the global batch, for CPU tensors
# ---------------------------------------------------------------------------------------------------------------

_BN_DIMS = (0, 2, 3)


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    """``(C,)`` float64 statistics as a ``(1, C, 1, 1)`` tensor of ``like``'s dtype."""
    return values.to(like.dtype).view(1, -1, 1, 1)


class _GlobalBatchNorm2dFunction(torch.autograd.Function):
    """Training-mode batch norm whose statistics are those of the batches of all ranks together.

    Forward: global mean and (biased) variance from all-reduced float64 sums
    (two passes: the mean, then the centred squares), ``y = x̂·w + b``.
    Backward: with ``g = dL/dy`` and ``x̂`` the normalised input, the weight and
    bias gradients are this rank's sums ``Σ g·x̂`` and ``Σ g`` (DDP then
    averages them like every other gradient), and
    ``dx = w/σ · (g − ΣG/M − x̂·ΣGX̂/M)`` with the sums over the global batch
    of ``M`` values per channel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                eps: float, momentum: float) -> Tensor:
        local = torch.cat([x.sum(_BN_DIMS, dtype=torch.float64),
                           torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)])
        dist.all_reduce(local)
        count = local[-1]
        mean = local[:-1] / count
        centred = x - _per_channel(mean, x)
        square_sum = (centred * centred).sum(_BN_DIMS, dtype=torch.float64)
        dist.all_reduce(square_sum)
        var = square_sum / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centred * _per_channel(invstd, x)
        with torch.no_grad():  # as nn.BatchNorm2d: the running variance is the unbiased one
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * count / torch.clamp(count - 1, min=1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        return x_hat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_hat, weight, invstd, count = ctx.saved_tensors
        grad_sum = grad_out.sum(_BN_DIMS, dtype=torch.float64)
        grad_dot_x_hat = (grad_out * x_hat).sum(_BN_DIMS, dtype=torch.float64)
        grad_weight = grad_dot_x_hat.to(weight.dtype)
        grad_bias = grad_sum.to(weight.dtype)
        global_sums = torch.cat([grad_sum, grad_dot_x_hat])
        dist.all_reduce(global_sums)
        global_grad_sum, global_grad_dot = global_sums.chunk(2)
        scale = weight.to(torch.float64) * invstd
        grad_x = _per_channel(scale, grad_out) * (grad_out - _per_channel(global_grad_sum / count, grad_out)
                                                  - x_hat * _per_channel(global_grad_dot / count, grad_out))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics span the batches of all ranks (CPU tensors, gloo).

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` and
    ``nn.SyncBatchNorm``. In eval mode, or without a process group of more than
    one rank, it is exactly ``nn.BatchNorm2d``.
    ``forward(x (N, C, H, W)) -> (N, C, H, W)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.device.type != "cpu":
            raise RuntimeError("CPUSyncBatchNorm serves CPU tensors; use torch.nn.SyncBatchNorm on GPUs")
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _GlobalBatchNorm2dFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                self.eps, momentum)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: ``nn.SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm` on CPUs.

    Returns the converted model (the same object on CPU; parameters and
    buffers are carried over, so a converted model computes the same in eval mode).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            if not (module.affine and module.track_running_stats):
                raise SetupError("--sync-bn on CPU supports affine batch norms that track running statistics")
            synced = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum)
            synced.load_state_dict(module.state_dict())
            synced.train(module.training)
            return synced
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)
