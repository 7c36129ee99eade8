"""What a run tells as it goes: a row of ``log.jsonl`` (and the progress bar and tracker) per logged step,
the bad samples an epoch skipped, and sample grids of generations."""

from __future__ import annotations

import json
import os
import time

import torch

from .arguments import TrainingArguments
from .pictures import preview_grid
from .run_state import Run


def log_step(run: Run, out, targs: TrainingArguments) -> None:
    """One row of ``log.jsonl`` (losses averaged over processes), the progress bar and the tracker."""
    parts = torch.stack([out.loss.detach(), out.text_loss, *out.modality_losses.values()])
    parts = run.acc.reduce(parts, "mean").tolist()  # averaged over processes
    elapsed = time.time() - run.start
    row = {"step": run.step, "loss": parts[0], "text_loss": parts[1],
           **{f"{m}_loss": v for m, v in zip(out.modality_losses, parts[2:])},
           "lr": run.sched.get_last_lr()[0],
           "grad_norm": None if run.grad_norm is None else float(run.grad_norm),  # DeepSpeed may not say
           "skipped_steps": run.bad_steps,
           "elapsed_s": round(elapsed, 2), "tokens_per_s": round(run.tokens / elapsed)}
    run.postfix.update(loss=f"{row['loss']:.3f}", text=f"{row['text_loss']:.3f}")
    run.bar.set_postfix(run.postfix)
    if run.acc.is_main_process:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    if targs.log_with:
        run.acc.log({k: v for k, v in row.items() if k != "step"}, step=run.step)


def report_skipped(run: Run, epoch: int) -> None:
    """Say how many bad samples this epoch skipped, with a few reasons."""
    collator = run.collator
    if collator.skipped > run.skipped_before:
        run.acc.print(f"mmar: epoch {epoch}: skipped {collator.skipped - run.skipped_before} bad sample(s) "
                      f"({collator.skipped} in all); e.g. {'; '.join(dict.fromkeys(collator.reasons))}")
        run.skipped_before, collator.reasons = collator.skipped, []


def preview(model, processor, dataset, targs: TrainingArguments, name: str) -> None:
    """A grid of generated samples from the dataset's preview prompts, if it has any."""
    prompts = getattr(dataset, "preview_prompts", None)
    if prompts is None:
        return
    path = os.path.join(targs.output_dir, "samples", f"{name}.png")
    preview_grid(model, processor, prompts(), path, seed=targs.seed)
