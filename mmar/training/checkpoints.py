"""Training checkpoints: writing (atomically, oldest pruned), listing and choosing one to resume from.

A checkpoint is ``output_dir/checkpoints/step_N``, every file safetensors + JSON (:mod:`.safe_state`),
nothing pickled and nothing unpickled: ``model`` (the whole weights), ``optimizer`` (under DeepSpeed
ZeRO-1/2 one ``optimizer_rankR`` a process: its partition and fp32 master copy), ``scheduler``,
``rng_rankR`` (Python, numpy and torch generators of each process), ``scaler`` (fp16), ``ema``, and
``trainer_state.json`` (the step, the position in a stream, accelerate's step, and the size of every file),
written last. The whole is written into ``.tmp_step_N``, fsynced, renamed: a directory ``step_N`` with a
``trainer_state.json`` whose files all have their recorded sizes is complete; ``latest`` takes the newest
complete one. A failed write (a full disk) removes the partial directory and raises one clear error.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .safe_state import fsync_dir, fsync_file, read_json, read_state, write_json, write_state

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the partial one was removed."""


@dataclass
class TrainingState:
    """What a checkpoint holds besides the position: the prepared model, optimizer and schedule, and the
    EMA copy if kept."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    ema: Any = None


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The ``step_N`` directories under ``output_dir/checkpoints``, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def incomplete_reason(checkpoint: str) -> str | None:
    """Why ``checkpoint`` is not a complete mmar checkpoint, or None when it is."""
    try:
        state = read_trainer_state(checkpoint)
    except (OSError, ValueError) as e:
        return str(e)
    files = state.get("files")
    if not isinstance(files, dict) or "model.json" not in files:
        return f"{os.path.join(checkpoint, STATE)}: no list of files (a checkpoint of an older, pickled format?)"
    for name, size in files.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return f"{path}: missing or truncated"
    return None


def resolve_checkpoint(output_dir: str, which: str | None) -> str | None:
    """The checkpoint directory to resume from: ``which`` itself, or for ``latest`` the newest complete one
    under ``output_dir`` (an incomplete newer one is passed over with a warning); None when there is none."""
    if not which:
        return None
    if which != "latest":
        reason = incomplete_reason(which)
        if reason:
            raise FileNotFoundError(f"{which}: not a complete mmar checkpoint ({reason})")
        return which
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        reason = incomplete_reason(ckpt)
        if reason is None:
            return ckpt
        warnings.warn(f"{ckpt}: incomplete, passed over ({reason})")
    return None


def read_trainer_state(checkpoint: str) -> dict:
    """Our own part of a checkpoint: ``{"step": N, ...}`` (+ ``epoch`` / ``batches`` for streamed data)."""
    path = os.path.join(checkpoint, STATE)
    state = read_json(path, FileNotFoundError(f"{path}: missing (no {STATE})"))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: no step")
    return state


# -- what each process writes and reads -------------------------------------------------------------------
def _zero_optimizer(acc: Accelerator, model) -> Any:
    """DeepSpeed's ZeRO-1/2 optimizer (partitioned state + fp32 master copy), or None."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    zero = model.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError("checkpoints under DeepSpeed: only ZeRO stages 1 and 2 are supported")
    return zero


def rng_state() -> dict:
    """This process's generators: Python's, numpy's, torch's CPU one and each CUDA device's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_parts(acc: Accelerator, folder: str, parts: TrainingState) -> None:
    rank = acc.process_index
    weights = acc.get_state_dict(parts.model)  # a collective: whole tensors on the main process
    zero = _zero_optimizer(acc, parts.model)
    if zero is not None:  # every process its own partition
        engine = parts.model
        write_state(folder, f"optimizer_rank{rank}", {
            "base": zero.optimizer.state_dict(), "fp32": list(zero.single_partition_of_fp32_groups),
            "engine": {k: int(getattr(engine, k)) for k in ("global_steps", "global_samples", "skipped_steps",
                                                            "micro_steps")},
            "loss_scaler": _plain_attributes(zero.loss_scaler)})
    write_state(folder, f"rng_rank{rank}", rng_state())
    if not acc.is_main_process:
        return
    write_state(folder, "model", weights)
    if zero is None:
        write_state(folder, "optimizer", parts.optimizer.state_dict())
    write_state(folder, "scheduler", parts.scheduler.state_dict())
    if acc.scaler is not None:
        write_state(folder, "scaler", acc.scaler.state_dict())
    if parts.ema is not None:
        write_state(folder, "ema", parts.ema.state_dict())


def _plain_attributes(obj) -> dict:
    return {k: v for k, v in vars(obj).items() if v is None or isinstance(v, (bool, int, float, str))}


def load_training_state(acc: Accelerator, checkpoint: str, parts: TrainingState) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into the prepared objects (and the RNGs);
    returns its trainer state. A checkpoint that does not fit this run (another model, other shapes) is
    a ``ValueError`` naming it."""
    try:
        return _load_parts(acc, checkpoint, parts)
    except (RuntimeError, KeyError, TypeError, IndexError) as e:  # load_state_dict's mismatches, bad values
        raise ValueError(f"{checkpoint}: does not fit this run ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e


def _load_parts(acc: Accelerator, checkpoint: str, parts: TrainingState) -> dict:
    state = read_trainer_state(checkpoint)
    acc.unwrap_model(parts.model).load_state_dict(read_state(checkpoint, "model"))
    zero = _zero_optimizer(acc, parts.model)
    if zero is not None:
        _load_zero(acc, checkpoint, parts.model, zero, state)
    else:
        parts.optimizer.load_state_dict(read_state(checkpoint, "optimizer"))
    parts.scheduler.load_state_dict(read_state(checkpoint, "scheduler"))
    if acc.scaler is not None and os.path.exists(os.path.join(checkpoint, "scaler.json")):
        acc.scaler.load_state_dict(read_state(checkpoint, "scaler"))
    if parts.ema is not None:
        if not os.path.exists(os.path.join(checkpoint, "ema.json")):
            raise ValueError(f"{checkpoint}: has no EMA weights, and this run keeps an EMA (ema_decay)")
        parts.ema.load_state_dict(read_state(checkpoint, "ema"))
    name = f"rng_rank{acc.process_index}"
    if os.path.exists(os.path.join(checkpoint, f"{name}.json")):
        set_rng_state(read_state(checkpoint, name))
    else:
        warnings.warn(f"{checkpoint}: no random state for process {acc.process_index} (saved by "
                      f"{state.get('num_processes')} processes); the run goes on with fresh generators")
    acc.step = state.get("accelerate_step", 0)
    return state


def _load_zero(acc: Accelerator, checkpoint: str, engine, zero, state: dict) -> None:
    if state.get("num_processes") != acc.num_processes:
        raise ValueError(f"{checkpoint}: a DeepSpeed checkpoint of {state.get('num_processes')} processes cannot "
                         f"resume on {acc.num_processes}")
    part = read_state(checkpoint, f"optimizer_rank{acc.process_index}")
    zero.optimizer.load_state_dict(part["base"])
    for saved, current in zip(part["fp32"], zero.single_partition_of_fp32_groups, strict=True):
        current.data.copy_(saved)
    for k, v in part["engine"].items():
        setattr(engine, k, v)
    for k, v in part["loss_scaler"].items():
        setattr(zero.loss_scaler, k, v)


# -- one checkpoint, atomically ---------------------------------------------------------------------------
def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, limit: int,
                    position: dict | None = None, parts: TrainingState | None = None) -> None:
    """Write checkpoint ``step`` into a temporary directory, fsync it, then rename: a checkpoint is whole
    or absent. ``position``: where in the data the run is (for streamed data, whose epochs have no known
    length). A failed write on any process removes the partial directory and raises
    :class:`CheckpointWriteError`; earlier checkpoints stay as they were."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final, tmp = os.path.join(root, f"step_{step}"), os.path.join(root, f".tmp_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        _write_parts(accelerator, tmp, parts)
    except (OSError, RuntimeError) as e:  # torch / safetensors say "No space left" as RuntimeError too
        error = e
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if failed.item() == 0 and accelerator.is_main_process:
        try:
            _seal(accelerator, tmp, final, step, position)
        except OSError as e:
            error = e
    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
    if failed.item():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        why = _reason(error) if error is not None else "another process failed to write its part"
        raise CheckpointWriteError(f"{tmp}: could not write the checkpoint of step {step} ({why}); the partial "
                                   f"checkpoint was removed, earlier ones are intact") from error
    if accelerator.is_main_process:
        for old in checkpoint_dirs(output_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _reason(error: BaseException) -> str:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return "no space left on the device"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _seal(acc: Accelerator, tmp: str, final: str, step: int, position: dict | None) -> None:
    """The trainer state (with every file's size) last, fsync, rename, fsync the parent."""
    files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
    write_json(os.path.join(tmp, STATE), {"step": step, **(position or {}), "accelerate_step": acc.step,
                                          "num_processes": acc.num_processes, "format": "mmar-checkpoint-2",
                                          "files": files})
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


# -- the final model, atomically --------------------------------------------------------------------------
MARKERS = ("adapter_config.json", "config.json")  # what a loader looks for in a model directory


def _fsync_tree(folder: str) -> None:
    for here, _, names in os.walk(folder):
        for n in names:
            fsync_file(os.path.join(here, n))
        fsync_dir(here)


def publish_directory(tmp: str, target: str) -> None:
    """Move everything in ``tmp`` (a model written whole) into ``target``, fsynced first. The files a loader
    looks for (``config.json`` / ``adapter_config.json``) are removed from ``target`` first and moved in
    last, so a reader finds the old model, no model, or the new one whole: never a mix or a half."""
    _fsync_tree(tmp)
    for name in MARKERS:
        if os.path.exists(os.path.join(target, name)):
            os.remove(os.path.join(target, name))
    fsync_dir(target)
    names = sorted(os.listdir(tmp), key=lambda n: n in MARKERS)
    for name in names:
        src, dst = os.path.join(tmp, name), os.path.join(target, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    fsync_dir(target)
    os.rmdir(tmp)
