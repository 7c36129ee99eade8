"""The training loop: one accelerate loop for pre-training and fine-tuning.

AdamW with warm-up + cosine decay, gradient accumulation, clipping, mixed
precision, periodic ``save_state`` checkpoints (written atomically, oldest
pruned), ``resume_from_checkpoint``, a progress bar, a JSONL log, a loss-curve
PNG and sample grids, and a final ``save_pretrained`` directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

from ..modeling import build_model
from ..sequence import MMARProcessor
from ..tokenizers import add_modality_tokens, build_tokenizer, train_bpe_tokenizer
from .arguments import DataArguments, ModelArguments, TrainingArguments
from .data import Collator, SafeDataset, build_dataset
from .pictures import plot_loss_curve, preview_grid

CHECKPOINTS = "checkpoints"


def build_text_tokenizer(margs: ModelArguments, dataset):
    path = margs.text_tokenizer or margs.backbone_path
    if path:
        tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = train_bpe_tokenizer(dataset.texts(), vocab_size=margs.text_vocab_size)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    add_modality_tokens(tok, list(margs.modalities))
    return tok


def build_everything(margs: ModelArguments, dataset):
    if margs.init_from:
        from ..modeling import MMARModel

        if not os.path.isfile(os.path.join(margs.init_from, "config.json")):
            raise FileNotFoundError(f"{margs.init_from}: not a saved mmar model directory (no config.json)")
        return MMARModel.from_pretrained(margs.init_from), MMARProcessor.from_pretrained(margs.init_from)
    tokenizer = build_text_tokenizer(margs, dataset)
    backbone = margs.backbone_path or {**margs.backbone, "attn_implementation": margs.attn_implementation}
    model = build_model(backbone, tokenizer, margs.modalities, diffusion_loss_weight=margs.diffusion_loss_weight,
                        cond_dropout_prob=margs.cond_dropout_prob)
    processor = MMARProcessor(tokenizer, {m: build_tokenizer(s["tokenizer"]) for m, s in margs.modalities.items()})
    return model, processor


def with_lora(model, processor, margs: ModelArguments, output_dir: str, acc: Accelerator):
    """Wrap with LoRA. The adapter must find its exact base again: a base built here (not loaded
    from ``init_from``) is saved to ``output_dir/base`` first."""
    from .lora import apply_lora

    base = margs.init_from
    if base is None:
        base = os.path.join(output_dir, "base")
        if acc.is_main_process:
            model.save_pretrained(base)
            processor.save_pretrained(base)
        acc.wait_for_everyone()
    return apply_lora(model, dict(margs.lora), base_path=base)


def finite_everywhere(acc: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (they must all skip, or none)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(acc.reduce(bad, "sum").item() == 0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings of positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "pos_embeds" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], lr: float, beta2: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this torch has it for the parameters' device:
    on a 2-core CPU it takes a quarter of the for-each version's time per step (BENCHMARKS.md)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=True)
    except (RuntimeError, TypeError, ValueError):  # e.g. a dtype or device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2))


def checkpoint_dirs(output_dir: str) -> list[str]:
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
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **(position or {})}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_checkpoint(output_dir: str, which: str | None) -> str | None:
    if not which:
        return None
    if which == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(which, "trainer_state.json")):
        raise FileNotFoundError(f"{which}: not a complete mmar checkpoint (no trainer_state.json)")
    return which


def train(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> str:
    """Train and return the directory of the final model (loadable by ``MMARModel.from_pretrained``)."""
    if targs.num_threads:
        torch.set_num_threads(targs.num_threads)
    from ..pipeline import GenerationDefaults

    GenerationDefaults.for_model(None, **targs.generation)  # a typo in `generation` fails now, not after training
    acc = Accelerator(gradient_accumulation_steps=targs.gradient_accumulation_steps,
                      mixed_precision=targs.mixed_precision, project_dir=targs.output_dir,
                      log_with=targs.log_with,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False))
    if targs.log_with:
        acc.init_trackers("mmar")
    set_seed(targs.seed)
    dataset = build_dataset(dargs.dataset, "train", seed=targs.seed, pairs_per_image=dargs.pairs_per_image,
                            shift_prob=dargs.shift_prob, data_files=dargs.data_files, streaming=dargs.streaming,
                            shuffle_buffer=dargs.shuffle_buffer)
    stream = getattr(dataset, "is_stream", False)  # an IterableDataset: epochs of unknown length
    model, processor = build_everything(margs, dataset)
    if margs.lora:
        model = with_lora(model, processor, margs, targs.output_dir, acc)
    collator = Collator(processor, margs.cond_dropout_prob, pack_length=dargs.max_length if dargs.packing else 0,
                        seed=targs.seed)
    # a stream shuffles itself (seed, epoch) and yields (index, sample) pairs; its own generator also keeps
    # the loader's per-iterator seed draw off the global RNG, which checkpoints restore
    loader = DataLoader(dataset if stream else SafeDataset(dataset), batch_size=targs.batch_size,
                        shuffle=not stream, drop_last=True, collate_fn=collator, num_workers=dargs.num_workers,
                        generator=torch.Generator().manual_seed(targs.seed))
    opt = make_optimizer(param_groups(model, targs.weight_decay), targs.learning_rate, targs.adam_beta2)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, targs.warmup_steps, targs.max_steps,
                                                        min_lr_rate=targs.min_lr_ratio)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    acc.register_for_checkpointing(sched)
    ema = None
    if targs.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(acc.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(targs.ema_decay),
                            use_buffers=True)
        acc.register_for_checkpointing(ema)
    os.makedirs(targs.output_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    acc.print(f"mmar: {n_params / 1e6:.2f}M parameters, {'streamed' if stream else len(dataset)} samples, "
              f"{targs.max_steps} steps")

    step, log_path = 0, os.path.join(targs.output_dir, "log.jsonl")
    stream_epoch, stream_batches = 0, 0  # streamed data: the epoch, and the loader batches read in it
    ckpt = resolve_checkpoint(targs.output_dir, targs.resume_from_checkpoint)
    if ckpt:
        acc.load_state(ckpt)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        step, stream_epoch, stream_batches = state["step"], state.get("epoch", 0), state.get("batches", 0)
        acc.print(f"mmar: resumed from {ckpt} at step {step}")
    elif acc.is_main_process and os.path.exists(log_path):
        os.remove(log_path)
    steps_per_epoch = None if stream else len(loader) // targs.gradient_accumulation_steps
    bar = tqdm(total=targs.max_steps, initial=step, desc="training", disable=not (targs.progress and acc.is_main_process))
    start, tokens, skipped_before, bad_in_a_row = time.time(), 0, 0, 0
    model.train()
    while step < targs.max_steps:
        if stream:
            epoch, skip = stream_epoch, stream_batches
        else:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            skip = done_in_epoch * targs.gradient_accumulation_steps
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        collator.epoch = epoch  # per-sample randomness is a function of (seed, epoch, index)
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        read = skip
        for batch in batches:
            read += 1
            if batch is None:  # every sample of this batch was bad (counted by the collator)
                continue
            n_tokens = sum(map(sum, batch.pop("seq_lens"))) if "seq_lens" in batch else int(batch["attention_mask"].sum())
            batch.pop("sample_index", None)
            with acc.accumulate(model):
                out = model(**batch)
                if not finite_everywhere(acc, out.loss):
                    bad_in_a_row += 1
                    opt.zero_grad(set_to_none=True)
                    if bad_in_a_row >= targs.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_in_a_row} steps in a row had a NaN / inf loss (last at step {step + 1}); "
                            "stopping. Lower the learning rate, check the data, or resume from a checkpoint.")
                    warnings.warn(f"step {step + 1}: loss is {out.loss.item()}; skipping this batch "
                                  f"({bad_in_a_row} in a row, the run stops at {targs.max_bad_steps})")
                    continue
                bad_in_a_row = 0
                acc.backward(out.loss)
                if acc.sync_gradients and targs.max_grad_norm:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), targs.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            tokens += n_tokens
            if not acc.sync_gradients:
                continue
            if ema is not None:
                ema.update_parameters(acc.unwrap_model(model))
            step += 1
            bar.update(1)
            if step % targs.logging_steps == 0 or step == targs.max_steps:
                parts = torch.stack([out.loss.detach(), out.text_loss, *out.modality_losses.values()])
                parts = acc.reduce(parts, "mean").tolist()  # averaged over processes
                row = {"step": step, "loss": parts[0], "text_loss": parts[1],
                       **{f"{m}_loss": v for m, v in zip(out.modality_losses, parts[2:])},
                       "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "elapsed_s": round(time.time() - start, 2), "tokens_per_s": round(tokens / (time.time() - start))}
                bar.set_postfix(loss=f"{row['loss']:.3f}", text=f"{row['text_loss']:.3f}")
                if acc.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if targs.log_with:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
            if targs.save_steps and step % targs.save_steps == 0 and step < targs.max_steps:
                save_checkpoint(acc, targs.output_dir, step, targs.save_total_limit,
                                {"epoch": epoch, "batches": read} if stream else None)
                if acc.is_main_process:
                    plot_loss_curve(log_path, os.path.join(targs.output_dir, "loss_curve.png"))
            if targs.sample_steps and step % targs.sample_steps == 0 and acc.is_main_process:
                preview(acc.unwrap_model(model), processor, dataset, targs, f"step_{step}")
                model.train()
            if step >= targs.max_steps:
                break
        if stream and step < targs.max_steps:
            if read == 0:
                raise ValueError(f"{dargs.data_files}: the stream gave no full batch of {targs.batch_size} in epoch "
                                 f"{epoch}; it has fewer records than the batch size")
            stream_epoch, stream_batches = epoch + 1, 0
        if collator.skipped > skipped_before:
            acc.print(f"mmar: epoch {epoch}: skipped {collator.skipped - skipped_before} bad sample(s) "
                      f"({collator.skipped} in all); e.g. {'; '.join(dict.fromkeys(collator.reasons))}")
            skipped_before, collator.reasons = collator.skipped, []
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(model) if ema is None else ema.module
        final.save_pretrained(targs.output_dir)
        processor.save_pretrained(targs.output_dir)
        GenerationDefaults.for_model(final.config, **targs.generation).save_pretrained(targs.output_dir)
        plot_loss_curve(log_path, os.path.join(targs.output_dir, "loss_curve.png"))
        preview(final, processor, dataset, targs, "final")
        acc.print(f"mmar: trained {step} steps in {time.time() - start:.0f}s; model saved to {targs.output_dir}")
    acc.end_training()
    return targs.output_dir


def preview(model, processor, dataset, targs: TrainingArguments, name: str) -> None:
    """A grid of generated samples from the dataset's preview prompts, if it has any."""
    prompts = getattr(dataset, "preview_prompts", None)
    if prompts is None:
        return
    path = os.path.join(targs.output_dir, "samples", f"{name}.png")
    preview_grid(model, processor, prompts(), path, seed=targs.seed)
