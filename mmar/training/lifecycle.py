"""A training run outside its steps: :func:`setup` builds its :class:`Run` (:mod:`.run_state`; accelerator,
data, model, optimizer, schedule, EMA), :func:`resume` restores it from a checkpoint
(:mod:`mmar.training.checkpoints`), and :func:`finish` writes the final ``save_pretrained`` directory, the
loss curve and the preview."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..data.registry import Collator
from .acceleration import compile_blocks, enable_checkpointing, make_accelerator, sharded
from .arguments import DataArguments, ModelArguments, TrainingArguments
from .batches import check_batches, make_data, make_loader, sample_limit
from .build import build_everything, make_optimizer, param_groups, with_lora
from .checkpoints import (
    CHECKPOINTS, TrainingState, checkpoint_dirs, load_training_state, publish_directory, resolve_checkpoint)
from .evaluation import finish_eval, held_out_data, make_evaluator
from .pictures import plot_loss_curve
from .reporting import preview
from .run_state import Run


def prepare_output_dir(acc: Accelerator, targs: TrainingArguments) -> None:
    """A fresh run (no ``resume_from_checkpoint``) into a directory holding another run's checkpoints refuses
    to mix them in, unless ``overwrite_output_dir`` (which removes them)."""
    old = checkpoint_dirs(targs.output_dir)
    if targs.resume_from_checkpoint or not old:
        return
    if not targs.overwrite_output_dir:
        names = ", ".join(map(os.path.basename, old))
        raise ValueError(f"{targs.output_dir}: holds another run's checkpoints ({names}); "
                         "resume it with --resume_from_checkpoint latest, choose another --output_dir, or pass "
                         "--overwrite_output_dir true to start over (removes them)")
    if acc.is_main_process:
        shutil.rmtree(os.path.join(targs.output_dir, CHECKPOINTS))
    acc.wait_for_everyone()


def setup(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> Run:
    """Accelerator, data, model, optimizer and schedule, prepared; EMA if asked."""
    acc = make_accelerator(targs)
    prepare_output_dir(acc, targs)
    set_seed(targs.seed)
    dataset, stream = make_data(dargs, targs)
    dataset, held_out = held_out_data(dataset, dargs, targs)  # an eval_split is left out of training
    model, processor = build_everything(margs, dataset)
    max_length = sample_limit(model, dargs, acc)
    if targs.gradient_checkpointing:
        layers, blocks = enable_checkpointing(model)
        acc.print(f"mmar: gradient checkpointing: {layers} decoder layers, {blocks} head blocks")
    if margs.lora:
        model = with_lora(model, processor, margs, targs.output_dir, acc)
    if targs.torch_compile:
        acc.print(f"mmar: torch.compile: {compile_blocks(model)} decoder layers (inductor)")
    collator = Collator(processor, margs.cond_dropout_prob, pack_length=max_length if dargs.packing else 0,
                        seed=targs.seed, max_length=max_length, item_dropout_prob=margs.cond_item_dropout_prob)
    loader = make_loader(dataset, stream, collator, dargs, targs)
    opt = make_optimizer(param_groups(model, targs.weight_decay), targs.learning_rate, targs.adam_beta2)
    # accelerate steps a prepared schedule once per process at each optimizer step (its convention for
    # per-process batches): count the schedule in those steps, so that step N has the same lr however many run
    n = acc.num_processes
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, targs.warmup_steps * n, targs.max_steps * n,
                                                        min_lr_rate=targs.min_lr_ratio)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)  # checkpoints: .checkpoints, never pickle
    check_batches(dataset, stream, loader, dargs, targs)
    if sharded(acc) and (targs.save_steps or targs.resume_from_checkpoint):
        raise ValueError("save_steps / resume_from_checkpoint: checkpoints of sharded (FSDP / ZeRO-3) weights are "
                         "not supported (mmar writes safetensors + JSON only, never accelerate's pickles); train "
                         "with --save_steps 0, or with DDP / DeepSpeed ZeRO-2")
    ema = None
    if targs.ema_decay and sharded(acc):
        raise ValueError("ema_decay: an EMA copy of sharded (FSDP / ZeRO-3) weights is not supported; "
                         "train without it, or with DDP / DeepSpeed ZeRO-2")
    if targs.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(acc.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(targs.ema_decay),
                            use_buffers=True)
    os.makedirs(targs.output_dir, exist_ok=True)
    save_run_args(acc, margs, dargs, targs)
    n_params = sum(p.numel() for p in model.parameters())
    acc.print(f"mmar: {n_params / 1e6:.2f}M parameters, {'streamed' if stream else len(dataset)} samples"
              f"{'' if held_out is None else f' (+ {len(held_out)} held out)'}, {targs.max_steps} steps")
    return Run(acc, model, processor, dataset, collator, loader, opt, sched, ema=ema, stream=stream,
               log_path=os.path.join(targs.output_dir, "log.jsonl"),
               evaluator=make_evaluator(held_out, processor, targs))


def save_run_args(acc: Accelerator, margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> None:
    """``output_dir/training_args.json``: every option of the run, with the precision really used."""
    if not acc.is_main_process:
        return
    args = {**asdict(margs), **asdict(dargs), **asdict(targs), "mixed_precision": acc.mixed_precision}
    path = os.path.join(targs.output_dir, "training_args.json")
    with open(path + ".tmp", "w") as f:
        json.dump(args, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def resume(run: Run, targs: TrainingArguments) -> None:
    """Load the checkpoint asked for (if any) and move the run's position there; a fresh run starts a
    fresh log."""
    ckpt = resolve_checkpoint(targs.output_dir, targs.resume_from_checkpoint)
    if ckpt:
        state = load_training_state(run.acc, ckpt, TrainingState(run.model, run.opt, run.sched, run.ema))
        run.step, run.stream_epoch, run.stream_batches = state["step"], state.get("epoch", 0), state.get("batches", 0)
        if run.evaluator is not None:
            run.evaluator.load_state(state)  # the best eval so far, the evals without improvement
        run.acc.print(f"mmar: resumed from {ckpt} at step {run.step}")
    elif run.acc.is_main_process and os.path.exists(run.log_path):
        os.remove(run.log_path)


def finish(run: Run, targs: TrainingArguments) -> None:
    """Save the final model (the EMA weights if kept), its processor and sampling defaults, the loss
    curve and a last preview. The weights are gathered from every process first (accelerate's
    ``get_state_dict``: whole tensors even when FSDP / ZeRO shards them), then written by the main one."""
    from ..pipeline import GenerationDefaults

    acc = run.acc
    run.bar.close()
    acc.wait_for_everyone()
    state = acc.get_state_dict(run.model) if run.ema is None else None  # a collective: every process calls it
    if acc.is_main_process:
        final = acc.unwrap_model(run.model) if run.ema is None else run.ema.module
        tmp = os.path.join(targs.output_dir, ".tmp_final")  # written whole, then moved in (atomically)
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp, state_dict=state)
        run.processor.save_pretrained(tmp)
        GenerationDefaults.for_model(final.config, **targs.generation).save_pretrained(tmp)
        publish_directory(tmp, targs.output_dir)
        if finish_eval(run, targs):  # --load_best_model_at_end: the best eval's weights replace these
            final = reload_final(targs.output_dir)
        plot_loss_curve(run.log_path, os.path.join(targs.output_dir, "loss_curve.png"))
        if sharded(acc):  # this process holds a shard only: preview the saved (whole) model instead
            final = reload_final(targs.output_dir)
        preview(final, run.processor, run.dataset, targs, "final")
        skipped = f" ({run.bad_steps} batch(es) skipped for a NaN / inf loss or gradient)" if run.bad_steps else ""
        acc.print(f"mmar: trained {run.step} steps in {time.time() - run.start:.0f}s{skipped}; model saved to "
                  f"{targs.output_dir}")
    acc.wait_for_everyone()
    acc.end_training()


def reload_final(output_dir: str):
    """The saved final model (or LoRA adapter on its base), whole, on this process alone."""
    from ..modeling import MMARModel

    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        from .lora import load_adapter

        return load_adapter(output_dir).eval()
    return MMARModel.from_pretrained(output_dir).eval()
