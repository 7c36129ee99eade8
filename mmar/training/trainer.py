"""The training loop: one accelerate loop for pre-training and fine-tuning.

AdamW with warm-up + cosine decay, gradient accumulation, clipping, mixed
precision, periodic checkpoints (:mod:`mmar.training.checkpoints`),
``resume_from_checkpoint``, a progress bar, a JSONL log, a loss-curve PNG and
sample grids, and a final ``save_pretrained`` directory.

``train`` runs named steps on one :class:`Run`: :func:`setup`, :func:`resume`,
then :func:`run_epoch` (each batch through :func:`train_step`, then
:func:`after_step` / :func:`log_step`) until ``max_steps``, and :func:`finish`.
The parts live in their own modules: :mod:`.lifecycle` (setup, resume,
finish), :mod:`.acceleration`, :mod:`.build`, :mod:`.batches`, :mod:`.step`
and :mod:`.reporting`; their public names stay importable from here.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm.auto import tqdm

from .acceleration import (
    PRECISIONS, check_precision, check_processes, compile_blocks, enable_checkpointing, make_accelerator,
    scale_options, sharded)
from .arguments import DataArguments, ModelArguments, TrainingArguments
from .batches import check_batches, data_name, make_data, make_loader, sample_limit
from .build import build_everything, build_text_tokenizer, make_optimizer, param_groups, with_lora
from .checkpoints import CHECKPOINTS, TrainingState, checkpoint_dirs, save_checkpoint
from .evaluation import check_eval_arguments, run_eval
from .lifecycle import Run, finish, prepare_output_dir, reload_final, resume, save_run_args, setup
from .pictures import plot_loss_curve
from .reporting import log_step, preview, report_skipped
from .step import checks_gradients, finite_everywhere, gradient_norm, skip_bad_batch, train_step

__all__ = [  # every name importable from here before the split; after_step calls this module's log_step
    "CHECKPOINTS", "PRECISIONS", "Run", "after_step", "build_everything", "build_text_tokenizer", "check_batches",
    "check_precision", "check_processes", "checkpoint_dirs", "checks_gradients", "compile_blocks", "data_name",
    "done", "enable_checkpointing", "finish", "finite_everywhere", "gradient_norm", "log_step", "make_accelerator",
    "make_data", "make_loader", "make_optimizer", "param_groups", "prepare_output_dir", "preview", "reload_final",
    "report_skipped", "resume", "run_epoch", "sample_limit", "save_run_args", "scale_options", "setup", "sharded",
    "skip_bad_batch", "start_epoch", "train", "train_step", "with_lora",
]


def train(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> str:
    """Train and return the directory of the final model (loadable by ``MMARModel.from_pretrained``)."""
    if targs.num_threads:
        torch.set_num_threads(targs.num_threads)
    from ..pipeline import GenerationDefaults

    GenerationDefaults.for_model(None, **targs.generation)  # a typo in `generation` fails now, not after training
    check_eval_arguments(dargs, targs)
    run = setup(margs, dargs, targs)
    resume(run, targs)
    run.bar = tqdm(total=targs.max_steps, initial=run.step, desc="training",
                   disable=not (targs.progress and run.acc.is_main_process))
    run.start = time.time()
    run.model.train()
    while not done(run, targs):
        run_epoch(run, dargs, targs)
    finish(run, targs)
    return targs.output_dir


def run_epoch(run: Run, dargs: DataArguments, targs: TrainingArguments) -> None:
    """Train through (the rest of) one epoch, or until ``max_steps``."""
    epoch, skip = start_epoch(run, targs)
    batches = run.acc.skip_first_batches(run.loader, skip) if skip else run.loader
    read, usable = skip, 0
    for batch in batches:
        read += 1
        if batch is None:  # every sample of this batch was bad (counted by the collator)
            continue
        usable += 1
        n_tokens = sum(map(sum, batch.pop("seq_lens"))) if "seq_lens" in batch else int(batch["attention_mask"].sum())
        batch.pop("sample_index", None)
        out = train_step(run, batch, targs)
        if out is None:
            continue
        run.tokens += n_tokens
        if not run.acc.sync_gradients:
            continue
        after_step(run, out, targs, epoch, read)
        if done(run, targs):
            break
    if run.stream and not done(run, targs):
        if read == 0:
            raise ValueError(f"{data_name(dargs)}: the stream gave no full batch of {targs.batch_size} in epoch "
                             f"{epoch}; it has fewer records than the batch size (or none)")
        run.stream_epoch, run.stream_batches = epoch + 1, 0
    if usable == 0 and read > skip:
        raise ValueError(f"{data_name(dargs)}: not one usable batch in epoch {epoch}: {read - skip} batch(es) of "
                         f"{targs.batch_size} read, {run.collator.skipped - run.skipped_before} bad record(s) skipped; "
                         f"e.g. {'; '.join(dict.fromkeys(run.collator.reasons)) or '?'}")
    report_skipped(run, epoch)


def start_epoch(run: Run, targs: TrainingArguments):
    """The epoch the run is in and the loader batches of it already trained (skipped on resume)."""
    if run.stream:
        epoch, skip = run.stream_epoch, run.stream_batches
    else:
        steps_per_epoch = len(run.loader) // targs.gradient_accumulation_steps
        epoch, done_in_epoch = divmod(run.step, steps_per_epoch)
        skip = done_in_epoch * targs.gradient_accumulation_steps
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(epoch)
    run.collator.epoch = epoch  # per-sample randomness is a function of (seed, epoch, index)
    if hasattr(run.dataset, "epoch"):
        run.dataset.epoch = epoch
    return epoch, skip


def after_step(run: Run, out, targs: TrainingArguments, epoch: int, read: int) -> None:
    """What follows an optimizer step: EMA, the step count, the log, a checkpoint, a preview."""
    acc, step = run.acc, run.step + 1
    if run.ema is not None:
        run.ema.update_parameters(acc.unwrap_model(run.model))
    run.step = step
    run.bar.update(1)
    if step % targs.logging_steps == 0 or step == targs.max_steps:
        log_step(run, out, targs)
    if run.evaluator is not None:
        run.evaluator.observe(out.loss)
        if run.evaluator.due(step):
            run_eval(run, targs, whole=not sharded(acc))
    if targs.save_steps and step % targs.save_steps == 0 and step < targs.max_steps:
        position = {"epoch": epoch, "batches": read} if run.stream else {}
        save_checkpoint(acc, targs.output_dir, step, targs.save_total_limit,
                        {**position, **(run.evaluator.state() if run.evaluator else {})} or None,
                        TrainingState(run.model, run.opt, run.sched, run.ema))
        if acc.is_main_process:
            plot_loss_curve(run.log_path, os.path.join(targs.output_dir, "loss_curve.png"))
    if targs.sample_steps and step % targs.sample_steps == 0 and acc.is_main_process and not sharded(acc):
        preview(acc.unwrap_model(run.model), run.processor, run.dataset, targs, f"step_{step}")
        run.model.train()


def done(run: Run, targs: TrainingArguments) -> bool:
    """``max_steps`` reached, or early stopping says so."""
    return run.step >= targs.max_steps or (run.evaluator is not None and run.evaluator.stop)
