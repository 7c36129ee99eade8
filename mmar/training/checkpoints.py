"""Training checkpoints: writing (atomically, oldest pruned), listing and choosing one to resume from.

A checkpoint is ``output_dir/checkpoints/step_N``: accelerate's ``save_state`` plus our own
``trainer_state.json`` (the step, and for streamed data the position in the epoch). It is written into
``.tmp_step_N`` and renamed, so a checkpoint directory is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil

from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The ``step_N`` directories under ``output_dir/checkpoints``, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, limit: int,
                    position: dict | None = None) -> None:
    """``save_state`` into a temporary directory, then rename: a checkpoint is whole or absent.
    ``position``: where in the data the run is (for streamed data, whose epochs have no known length)."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final, tmp = os.path.join(root, f"step_{step}"), os.path.join(root, f".tmp_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # FSDP's sharded save writes into it from every process: it must exist first
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its part (its shards, its RNG state)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({"step": step, **(position or {})}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_checkpoint(output_dir: str, which: str | None) -> str | None:
    """The checkpoint directory to resume from: ``which`` itself, the newest under ``output_dir`` for
    ``latest``, or None."""
    if not which:
        return None
    if which == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(which, STATE)):
        raise FileNotFoundError(f"{which}: not a complete mmar checkpoint (no {STATE})")
    return which


def read_trainer_state(checkpoint: str) -> dict:
    """Our own part of a checkpoint: ``{"step": N}`` (+ ``epoch`` / ``batches`` for streamed data)."""
    with open(os.path.join(checkpoint, STATE)) as f:
        return json.load(f)
