"""``python -m se_fused.train``: DDP over gloo, exact resumption, checkpoints, learning, and setup errors.

Everything runs on the CPU with ``--arch se_resnet_tiny`` (se_fused's
Bottleneck blocks with the fused SE block in residual form, 16-32-64 channels,
about 13k parameters) on 12×12 synthetic images, with one torch thread per
process: a training step takes milliseconds, so each run here is a second or
two, and a two-rank ``torchrun`` a few seconds more for the process start-up.

What the GPU path adds (NCCL, bf16 autocast, channels_last, torch's
SyncBatchNorm) is not exercised here; those runs are described in
docs/training.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from se_fused.train import (EXIT_SETUP_ERROR, EXIT_TERMINATED, StepDecaySchedule, parse_args, scaled_lr,
                            train)
from se_fused.training import SetupError
from se_fused.training.checkpoint import LAST_NAME, PREV_NAME, CheckpointError, load_checkpoint
from se_fused.training.data import ResumableDistributedSampler, SampleKey, SyntheticImages

REPO_ROOT = Path(__file__).resolve().parents[1]

# Four classes, 64 training images = 4 global batches of 16 per epoch. The learning rate halves every epoch after a
# two-step warm-up, so that a resumed run would visibly go wrong if the scheduler state were lost.
TINY = ["--synthetic", "--arch", "se_resnet_tiny", "--image-size", "12", "--num-classes", "4",
        "--synthetic-train-size", "64", "--synthetic-val-size", "24", "--batch-size", "16",
        "--lr", "0.2", "--lr-batch", "16", "--lr-step-epochs", "1", "--lr-decay", "0.5", "--warmup-epochs", "0.5",
        "--workers", "0", "--progress", "none", "--device", "cpu", "--threads", "1"]
STEPS_PER_EPOCH = 4
TIMING_KEYS = ("images_per_s", "train_seconds")


def run(output_dir: Path, *extra: str, base: List[str] = TINY):
    """One in-process training run (rank 0 of 1)."""
    return train(parse_args(base + ["--output-dir", str(output_dir)] + list(extra)))


def state_of(result) -> Dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}


def assert_bitwise_equal(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"not bitwise equal: {different}"


def max_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], names) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in names)


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------

def test_defaults_are_the_paper_recipe():
    """SGD 0.9 / 1e-4, lr 0.6 at batch 1024 (linear scaling), /10 every 30 epochs, 100 epochs, RRC 224 + flip."""
    args = parse_args(["--synthetic"])
    assert (args.momentum, args.weight_decay, args.lr, args.lr_batch, args.batch_size) == (0.9, 1e-4, 0.6, 1024, 1024)
    assert (args.lr_step_epochs, args.lr_decay, args.epochs, args.warmup_epochs) == (30, 0.1, 100, 0.0)
    assert (args.image_size, args.crop_scale_min, args.hflip) == (224, 0.08, 0.5)
    assert (args.arch, args.se) == ("se_resnet50", "fused")
    assert tuple(args.mean) == (0.485, 0.456, 0.406) and tuple(args.std) == (0.229, 0.224, 0.225)
    assert scaled_lr(args) == 0.6
    assert scaled_lr(parse_args(["--synthetic", "--batch-size", "256"])) == pytest.approx(0.15)
    assert scaled_lr(parse_args(["--synthetic", "--batch-size", "2048"])) == pytest.approx(1.2)


def test_step_decay_schedule():
    """Factor 1 for epochs 0-29, 0.1 for 30-59, 0.01 for 60-89 (10 steps per epoch); linear warm-up if asked."""
    schedule = StepDecaySchedule(steps_per_epoch=10, step_epochs=30, decay=0.1)
    assert [schedule(s) for s in (0, 299, 300, 599, 600, 999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    warm = StepDecaySchedule(steps_per_epoch=10, step_epochs=30, decay=0.1, warmup_steps=4)
    assert [warm(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# Data order and augmentation
# ---------------------------------------------------------------------------------------------------------------

def test_global_batches_do_not_depend_on_the_world_size():
    """Step k's global batch (the union of every rank's local batch k) is the same set for 1, 2 and 4 ranks,
    and a sampler started part-way gives the rest of the same sequence: the basis of the DDP-equals-one-process
    and resume tests."""
    dataset = SyntheticImages(50, 3, 4, seed=0)
    global_batch, epoch = 8, 3

    def global_batches(world: int):
        local = global_batch // world
        per_rank = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(dataset, world, rank, seed=5)
            sampler.set_position(epoch, 0)
            keys = list(sampler)
            assert all(key.epoch == epoch for key in keys)
            per_rank.append([key.index for key in keys])
        steps = len(dataset) // global_batch
        return [sorted(i for rank in per_rank for i in rank[k * local:(k + 1) * local]) for k in range(steps)]

    single = global_batches(1)
    assert len(single) == 6 and len({i for batch in single for i in batch}) == 48
    assert global_batches(2) == single
    assert global_batches(4) == single

    sampler = ResumableDistributedSampler(dataset, 2, 1, seed=5)
    sampler.set_position(epoch, 0)
    everything = list(sampler)
    sampler.set_position(epoch, 12)
    assert list(sampler) == everything[12:] and len(sampler) == len(everything) - 12


def make_image_folder(root: Path, classes=("cat", "dog"), train_per_class=4, val_per_class=2, size=20,
                      empty_class=None) -> Path:
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            if name == empty_class:
                continue
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                pixels[:, :, label % 3] = 200  # a colour per class
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_image_folder_training_and_seeded_augmentation(tmp_path):
    """An ImageFolder run with the paper's augmentation: one epoch, top-1/top-5 in the log. Each sample's
    random crop and flip are a function of (seed, epoch, index): equal when asked twice, in a worker process
    too, and different in another epoch."""
    from torch.utils.data import DataLoader
    from se_fused.train import build_datasets

    root = make_image_folder(tmp_path / "data")
    base = ["--data", str(root), "--arch", "resnet_tiny", "--image-size", "16", "--batch-size", "4",
            "--lr", "0.1", "--lr-batch", "4", "--epochs", "1", "--workers", "0", "--progress", "none",
            "--device", "cpu", "--threads", "1"]
    result = run(tmp_path / "out", base=base)
    (record,) = result.history
    assert record["epoch"] == 1 and record["global_step"] == 2
    assert 0 <= record["val_top1"] <= 1 and record["val_top5"] == 1.0  # two classes: always in the top 5
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text()) == record

    data = build_datasets(parse_args(base))
    assert data.num_classes == 2
    first = data.train[SampleKey(3, 0)][0]
    assert first.shape == (3, 16, 16)
    assert torch.equal(first, data.train[SampleKey(3, 0)][0])
    assert not torch.equal(first, data.train[SampleKey(3, 1)][0])
    keys = [SampleKey(i, 0) for i in range(8)]
    in_process = torch.stack([data.train[key][0] for key in keys])
    from_workers = torch.cat([images for images, _ in DataLoader(data.train, batch_size=2, sampler=keys,
                                                                 num_workers=2)])
    assert torch.equal(in_process, from_workers)


# ---------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------

def test_loss_goes_down_on_a_learnable_task(tmp_path):
    """Synthetic labels are visible in the images (a per-class pattern under noise): after 6 epochs the
    training loss is well below the first epoch's and validation accuracy well above chance (0.25)."""
    result = run(tmp_path, "--synthetic-train-size", "128", "--synthetic-val-size", "64", "--epochs", "6",
                 "--lr-decay", "1.0", "--warmup-epochs", "0")
    losses = [record["train_loss"] for record in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.history[-1]["val_top1"] >= 0.6, result.history[-1]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Exact resumption
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Three epochs (12 steps) without interruption: the reference of the resume tests."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run(directory, "--epochs", "3")
    return result, state_of(result), load_checkpoint(str(directory / LAST_NAME))


def test_uninterrupted_run_logs_each_epoch(uninterrupted):
    result, _, _ = uninterrupted
    assert result.stopped is None and (result.epoch, result.step_in_epoch, result.global_step) == (3, 0, 12)
    assert [record["epoch"] for record in result.history] == [1, 2, 3]
    # lr 0.2 halved every epoch; the logged rate is the one of each epoch's last step
    assert [record["lr"] for record in result.history] == pytest.approx([0.2, 0.1, 0.05])
    for record in result.history:
        assert set(record) >= {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s"}
        assert record["images_per_s"] > 0


def test_stop_and_resume_is_bitwise_exact(tmp_path, uninterrupted):
    """Stopped mid-epoch (step 3 of 4), then at an epoch boundary (step 8), then resumed to the end: model,
    BN buffers, optimizer momentum, scheduler and the logged history equal the uninterrupted run's bitwise."""
    reference, reference_state, reference_checkpoint = uninterrupted
    first = run(tmp_path, "--epochs", "3", "--max-steps", "3")
    assert first.stopped == "max_steps" and (first.epoch, first.step_in_epoch, first.global_step) == (0, 3, 3)
    saved = load_checkpoint(str(tmp_path / LAST_NAME))
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 3, 3)

    second = run(tmp_path, "--epochs", "3", "--max-steps", "8", "--resume")
    assert second.stopped == "max_steps" and (second.epoch, second.step_in_epoch) == (2, 0)
    final = run(tmp_path, "--epochs", "3", "--resume")
    assert final.stopped is None and final.global_step == 12

    assert_bitwise_equal(state_of(final), reference_state)
    checkpoint = load_checkpoint(str(tmp_path / LAST_NAME))
    for key in ("optimizer", "scheduler"):
        assert checkpoint[key].keys() == reference_checkpoint[key].keys()
    momentum = {str(i): s["momentum_buffer"] for i, s in checkpoint["optimizer"]["state"].items()}
    reference_momentum = {str(i): s["momentum_buffer"]
                          for i, s in reference_checkpoint["optimizer"]["state"].items()}
    assert_bitwise_equal(momentum, reference_momentum)
    assert checkpoint["scheduler"]["last_epoch"] == reference_checkpoint["scheduler"]["last_epoch"] == 12
    assert without_timing(final.history) == without_timing(reference.history)
    # No layer of these networks draws random numbers while training, so the generators' states at the end must
    # be those of the uninterrupted run (the round trip itself: test_rng_states_round_trip).
    assert checkpoint["rng"][0]["python"] == reference_checkpoint["rng"][0]["python"]
    assert torch.equal(checkpoint["rng"][0]["torch_cpu"], reference_checkpoint["rng"][0]["torch_cpu"])
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == final.history


def test_rng_states_round_trip(tmp_path):
    """Python's, NumPy's and torch's generators give the same draws after a save, more draws, and a restore."""
    import random
    import numpy
    from se_fused.training.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint

    def draws():
        return random.random(), float(numpy.random.rand()), float(numpy.random.randn()), torch.rand(3).tolist()

    numpy.random.randn()  # leaves a cached Gaussian in NumPy's state
    state = capture_rng_state(torch.device("cpu"))
    expected = draws()
    save_checkpoint({"rng": [state]}, str(tmp_path))
    draws()
    restore_rng_state(torch.load(tmp_path / LAST_NAME, weights_only=True)["rng"][0], torch.device("cpu"))
    assert draws() == expected


def test_sigterm_checkpoints_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM to every process of a running ``python -m se_fused.train --workers 2`` (as a scheduler that
    preempts a job sends it: loader workers included): it checkpoints where it is and exits with 143;
    ``--resume`` then ends bitwise where an uninterrupted run (loading in-process) ends."""
    base = TINY + ["--synthetic-train-size", "640"]  # 40 steps per epoch: the signal lands inside a run
    command = [sys.executable, "-m", "se_fused.train", *base, "--epochs", "20", "--workers", "2", "--progress",
               "print", "--print-freq", "1", "--output-dir", str(tmp_path / "run")]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, start_new_session=True)
    try:
        for line in process.stdout:
            if " step " in line:  # a step is done
                os.killpg(process.pid, signal.SIGTERM)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_TERMINATED, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    saved = load_checkpoint(str(tmp_path / "run" / LAST_NAME))
    assert 1 <= saved["global_step"] < 20 * 40
    print(f"SIGTERM checkpoint at epoch {saved['epoch']} step {saved['step_in_epoch']}")
    epochs = saved["epoch"] + 1  # finish the epoch it was stopped in

    resumed = run(tmp_path / "run", "--epochs", str(epochs), "--resume", base=base)
    reference = run(tmp_path / "reference", "--epochs", str(epochs), base=base)
    assert resumed.global_step == reference.global_step == epochs * 40
    assert_bitwise_equal(state_of(resumed), state_of(reference))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def two_epoch_run(tmp_path):
    """A finished two-epoch run: checkpoint-last.pt after epoch 2, checkpoint-prev.pt after epoch 1."""
    run(tmp_path, "--epochs", "2")
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tensor_changed"])
def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_one_still_loads(two_epoch_run, damage):
    """A half-written file, a file of garbage, or one whose tensor bytes changed after saving (which
    ``torch.load`` alone accepts silently; the stored SHA-256 catches it): ``--resume`` refuses with a message
    that names the file and the previous checkpoint, writes nothing, and the previous checkpoint resumes."""
    last, prev = two_epoch_run / LAST_NAME, two_epoch_run / PREV_NAME
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint" * 100)
    else:
        state = torch.load(last, weights_only=True)
        name = next(iter(state["model"]))
        state["model"][name].view(-1)[0] += 1
        torch.save(state, last)
    files_before = {path.name: path.read_bytes() for path in two_epoch_run.iterdir()}

    expected = "corrupt" if damage == "tensor_changed" else "unreadable, probably truncated or corrupt"
    with pytest.raises(CheckpointError, match=expected) as error:
        run(two_epoch_run, "--epochs", "3", "--resume")
    assert str(last) in str(error.value) and PREV_NAME in str(error.value)
    assert {path.name: path.read_bytes() for path in two_epoch_run.iterdir()} == files_before

    previous = load_checkpoint(str(prev))
    assert (previous["epoch"], previous["global_step"]) == (1, STEPS_PER_EPOCH)
    resumed = run(two_epoch_run, "--epochs", "3", "--resume", str(prev))
    assert resumed.stopped is None and resumed.global_step == 3 * STEPS_PER_EPOCH


def test_mismatched_checkpoint_is_a_clear_error(two_epoch_run, tmp_path_factory):
    """A checkpoint of another architecture, batch or seed, or a file that is not a trainer checkpoint."""
    last = str(two_epoch_run / LAST_NAME)
    other_dir = tmp_path_factory.mktemp("other")
    for flags, named in ((["--arch", "resnet_tiny"], "arch"), (["--batch-size", "32", "--lr-batch", "32"],
                                                                 "batch_size"), (["--seed", "1"], "seed")):
        with pytest.raises(CheckpointError, match=f"different run .*{named}: checkpoint"):
            run(other_dir, "--epochs", "3", "--resume", last, *flags)
    assert not any(other_dir.iterdir())  # nothing written

    foreign = other_dir / "weights.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a se_fused.train checkpoint"):
        run(other_dir, "--epochs", "3", "--resume", str(foreign))
    with pytest.raises(CheckpointError, match="no such file"):
        run(other_dir, "--epochs", "3", "--resume", str(other_dir / "missing.pt"))


def test_fresh_start_does_not_overwrite_checkpoints(two_epoch_run):
    with pytest.raises(SetupError, match="already holds .*pass --resume"):
        run(two_epoch_run, "--epochs", "3")


# ---------------------------------------------------------------------------------------------------------------
# Two ranks with gloo
# ---------------------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    # One torchrun worker: train with the given flags, then save this rank's final state dict.
    import os, sys, torch
    from se_fused.train import parse_args, train
    result = train(parse_args(sys.argv[2:]))
    torch.save(result.model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def torchrun_command(tmp_path: Path, *flags: str) -> List[str]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(driver), str(tmp_path), *flags]


def test_two_ranks_with_gloo_equal_one_process_on_the_global_batch(tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo, 8 images per rank, 20 steps per epoch) is sent SIGTERM after its
    first step; both ranks stop together at a step where they poll for it, with a checkpoint, and
    ``torchrun ... --resume`` finishes that epoch. Then both ranks hold bitwise identical parameters and
    buffers, equal within float32 rounding to one process training as many steps on the same global batch
    of 16, and the logged losses agree. The two-rank checkpoint also resumes in one process.

    Batch norm: under DDP each rank normalises with its own 8 images' statistics, one process with all 16's,
    so the two would compute different functions. ``--sync-bn`` makes both use the global batch's statistics
    (on CPUs the trainer's CPUSyncBatchNorm, torch's SyncBatchNorm being GPU-only), so they must agree.
    """
    base = TINY + ["--synthetic-train-size", "320", "--sync-bn"]
    steps_per_epoch = 20
    ddp_dir = tmp_path / "ddp"
    process = subprocess.Popen(torchrun_command(tmp_path, *base, "--epochs", "50", "--progress", "print",
                                                "--print-freq", "1", "--output-dir", str(ddp_dir)),
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path)
    try:
        for line in process.stdout:
            if " step " in line:
                process.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
                break
        output = process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            process.kill()
    stopped = load_checkpoint(str(ddp_dir / LAST_NAME))
    assert stopped["world_size"] == 2, output[-3000:]
    position = stopped["epoch"] * steps_per_epoch + stopped["step_in_epoch"]
    assert position == stopped["global_step"] and 0 < position < 50 * steps_per_epoch
    # with two ranks the signal is acted on at a step that is a multiple of TERMINATION_POLL_STEPS
    assert position % 10 == 0, position
    epochs = stopped["epoch"] + 1

    done = subprocess.run(torchrun_command(tmp_path, *base, "--epochs", str(epochs), "--output-dir", str(ddp_dir),
                                           "--resume"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_bitwise_equal(rank1, rank0)
    checkpoint = load_checkpoint(str(ddp_dir / LAST_NAME))
    assert checkpoint["world_size"] == 2 and checkpoint["global_step"] == epochs * steps_per_epoch
    assert_bitwise_equal(dict(checkpoint["model"]), rank0)

    single = run(tmp_path / "single", *["--synthetic-train-size", "320", "--sync-bn", "--epochs", str(epochs)])
    single_state = state_of(single)
    floats = [name for name, tensor in rank0.items() if tensor.is_floating_point()]
    # Float32 sums in another order (two halves all-reduced, BN statistics summed in float64 per rank) differ
    # in the last bits, and the SGD steps carry that along: measured 2.4e-7 after 12 steps (and 4e-2 without
    # --sync-bn). 1e-5 leaves room for more steps and other CPUs, and is far below how much ten steps of
    # training move the weights (checked next, against the SIGTERM checkpoint).
    tolerance = 1e-5
    assert max_difference(rank0, single_state, floats) < tolerance
    for name in rank0:
        if not rank0[name].is_floating_point():
            assert torch.equal(rank0[name], single_state[name]), name  # num_batches_tracked
    assert max_difference(rank0, stopped["model"], floats) > 100 * tolerance

    # The global batches do not depend on the world size, so the two-rank SIGTERM checkpoint (now the previous
    # one) also continues in one process, to the same result.
    assert load_checkpoint(str(ddp_dir / PREV_NAME))["global_step"] == position
    switched = run(tmp_path / "switched", "--synthetic-train-size", "320", "--sync-bn", "--epochs", str(epochs),
                   "--resume", str(ddp_dir / PREV_NAME))
    assert max_difference(state_of(switched), single_state, floats) < tolerance

    ddp_log = [json.loads(line) for line in (ddp_dir / "log.jsonl").read_text().splitlines()]
    assert len(ddp_log) == len(single.history) == epochs
    for got, expected in zip(ddp_log, single.history):
        for key in ("train_loss", "val_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4), key
        assert got["lr"] == pytest.approx(expected["lr"])


# ---------------------------------------------------------------------------------------------------------------
# Setup errors
# ---------------------------------------------------------------------------------------------------------------

def test_missing_data_directory(tmp_path):
    with pytest.raises(SetupError, match="no such directory"):
        run(tmp_path / "out", base=["--data", str(tmp_path / "nowhere"), "--device", "cpu"])
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SetupError, match="no val/ subfolder"):
        run(tmp_path / "out", base=["--data", str(tmp_path / "data"), "--device", "cpu"])


def test_empty_class_folder(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog", "owl"), empty_class="owl")
    with pytest.raises(SetupError, match="train: Found no valid file for the classes owl"):
        run(tmp_path / "out", base=["--data", str(root), "--device", "cpu", "--batch-size", "2"])


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SetupError, match="--batch-size 16 .* not divisible by the world size 3"):
        run(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["--dist-backend", "nccl"], "--dist-backend nccl needs CUDA GPUs"),
])
def test_device_requests_this_machine_cannot_serve(tmp_path, flags, message):
    with pytest.raises(SetupError, match=message):
        run(tmp_path, *flags)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_se_backend_that_cannot_serve_the_device(tmp_path, monkeypatch, backend):
    """--device cpu with a GPU-only SE backend (without the CUDA kernels, or on tensors it cannot compute on)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SetupError, match=f"--se-backend {backend} on cpu: se_fused: backend '{backend}'"):
        run(tmp_path, "--se-backend", backend)


def test_command_line_error_exits_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "se_fused.train", "--data", str(tmp_path / "nowhere"),
                           "--device", "cpu"], env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == EXIT_SETUP_ERROR
    assert "se_fused.train: error: --data" in done.stderr and "Traceback" not in done.stderr
