"""The training loop: one accelerate loop for pre-training and fine-tuning.

AdamW with warm-up + cosine decay, gradient accumulation, clipping, mixed
precision, periodic checkpoints (:mod:`mmar.training.checkpoints`),
``resume_from_checkpoint``, a progress bar, a JSONL log, a loss-curve PNG and
sample grids, and a final ``save_pretrained`` directory.

``train`` runs named steps on one :class:`Run`: :func:`setup`, :func:`resume`,
then :func:`run_epoch` (each batch through :func:`train_step`, then
:func:`after_step` / :func:`log_step`) until ``max_steps``, and :func:`finish`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

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
from .checkpoints import (  # noqa: F401 - CHECKPOINTS, checkpoint_dirs stay importable from here
    CHECKPOINTS, TrainingState, checkpoint_dirs, load_training_state, publish_directory, resolve_checkpoint,
    save_checkpoint)
from .data import Collator, SafeDataset, build_dataset
from .evaluation import check_eval_arguments, finish_eval, held_out_data, make_evaluator, run_eval
from .pictures import plot_loss_curve, preview_grid

def build_text_tokenizer(margs: ModelArguments, dataset):
    path = margs.text_tokenizer or margs.backbone_path
    if path:
        tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = train_bpe_tokenizer(dataset.texts(), vocab_size=margs.text_vocab_size)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    add_modality_tokens(tok, margs.modalities)  # a mapping: size markers too
    return tok


def build_everything(margs: ModelArguments, dataset):
    if margs.init_from:
        from ..modeling import MMARModel

        if not os.path.isfile(os.path.join(margs.init_from, "config.json")):
            raise FileNotFoundError(f"{margs.init_from}: not a saved mmar model directory (no config.json)")
        if margs.quantization:  # QLoRA: a frozen quantized base under the adapters
            from ..quantization import load_quantized

            if not margs.lora:
                raise ValueError("quantization: a quantized base cannot be trained in full; add --lora")
            model = load_quantized(margs.init_from, margs.quantization)
        else:
            model = MMARModel.from_pretrained(margs.init_from)
        return model, MMARProcessor.from_pretrained(margs.init_from)
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


@dataclass
class Run:
    """What one training run holds: built by :func:`setup`, moved on by the loop's steps."""

    acc: Accelerator
    model: torch.nn.Module
    processor: MMARProcessor
    dataset: Any
    collator: Collator
    loader: DataLoader
    opt: torch.optim.Optimizer
    sched: Any
    ema: Any = None
    stream: bool = False  # an IterableDataset: epochs of unknown length
    log_path: str = ""
    step: int = 0
    stream_epoch: int = 0  # streamed data: the epoch, and the loader batches read in it
    stream_batches: int = 0
    tokens: int = 0
    skipped_before: int = 0
    bad_in_a_row: int = 0
    bad_steps: int = 0  # batches skipped for a NaN / inf loss or gradient, in all
    grad_norm: Any = None
    start: float = field(default_factory=time.time)
    bar: Any = None
    postfix: dict = field(default_factory=dict)  # the progress bar's: train and eval losses
    evaluator: Any = None  # held-out evaluation (mmar.training.evaluation), None without held-out data


PRECISIONS = ("no", "bf16", "fp16", "fp8")


def make_accelerator(targs: TrainingArguments) -> Accelerator:
    """The run's Accelerator. Mixed precision: ``targs.mixed_precision`` if set, else the launcher's
    (``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch`` sets from its flag or config file)."""
    from accelerate.state import AcceleratorState

    if targs.mixed_precision is not None and targs.mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision: {targs.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state()  # an earlier run in this process: this one sets its own precision
    acc = Accelerator(gradient_accumulation_steps=targs.gradient_accumulation_steps,
                      mixed_precision=targs.mixed_precision, project_dir=targs.output_dir,
                      log_with=targs.log_with, **scale_options(targs),
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False))
    check_processes(acc)
    check_precision(acc, targs)
    if targs.log_with:
        acc.init_trackers("mmar")
    return acc


def check_precision(acc: Accelerator, targs: TrainingArguments) -> None:
    """Refuse a precision accelerate would silently not apply (fp16 autocast needs a GPU), and say which one
    the run uses and where it came from."""
    from accelerate.utils import DistributedType

    if acc.mixed_precision == "fp16" and not acc.native_amp and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(f"mixed_precision fp16 needs a GPU (accelerate runs {acc.device.type} in fp32 with it); "
                         "use bf16 or no")
    source = ("--mixed_precision" if targs.mixed_precision is not None else
              "ACCELERATE_MIXED_PRECISION" if "ACCELERATE_MIXED_PRECISION" in os.environ else "the default")
    acc.print(f"mmar: mixed precision {acc.mixed_precision} (from {source}) on {acc.device.type}")


def check_processes(acc: Accelerator) -> None:
    """Fail loudly where accelerate set up something else than what was launched: on CPU processes
    accelerate 1.15 enables FSDP for no device and counts one process each, so every process would train
    alone (a silent copy of the run per process)."""
    import accelerate
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        raise RuntimeError(f"FSDP was asked for, but accelerate {accelerate.__version__} set up "
                           f"{acc.distributed_type} on {acc.device.type}: it enables FSDP on GPU-like devices "
                           "(MULTI_GPU / XPU / NPU / HPU ...) only, not on CPU processes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but accelerate {accelerate.__version__} set up "
                           f"{acc.num_processes} ({acc.distributed_type}); each would train alone")


def scale_options(targs: TrainingArguments) -> dict:
    """Accelerator options for DeepSpeed: our clipping, and on a machine without GPUs the gloo backend
    (accelerate 1.15 picks none there, so it counts one process while DeepSpeed runs two)."""
    from accelerate.utils import InitProcessGroupKwargs

    options: dict = {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ.setdefault("ACCELERATE_GRADIENT_CLIPPING", str(targs.max_grad_norm or 0.0))  # ours, not DS' 1.0
        if not torch.cuda.is_available():
            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return options


def compile_blocks(model: torch.nn.Module) -> int:
    """``--torch_compile``: compile each decoder layer of the backbone in place (inductor). Regional
    compilation: the layers share one compiled graph (compiled once, reused), ``dynamic`` shapes serve
    every batch length, and the module tree and state-dict names stay as they are (checkpoints, LoRA,
    saving unchanged). The rest (embedding scatter, heads' sampling of noise) stays eager.
    Returns the number of layers compiled."""
    blocks = set(getattr(model.backbone, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    for layer in layers:
        layer.compile(backend="inductor", dynamic=True)
    return len(layers)


def enable_checkpointing(model: torch.nn.Module) -> tuple[int, int]:
    """``--gradient_checkpointing``: transformers' ``activation_checkpointing_enable`` on the whole model
    (non-reentrant ``torch.utils.checkpoint``), which flags the backbone's decoder layers and the heads'
    denoisers; the embeddings' outputs require grad, so a frozen (LoRA / quantized) base still passes
    gradients through recomputed layers. Returns (decoder layers, head blocks) checkpointed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ..heads import SimpleMLPAdaLN

    layers = sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())
    heads = sum(len(m.blocks) for m in model.modules() if isinstance(m, SimpleMLPAdaLN) and m.gradient_checkpointing)
    return layers, heads


def sharded(acc: Accelerator) -> bool:
    """Whether the model's parameters are split over the processes (FSDP, DeepSpeed ZeRO-3): then no
    process may run the model alone (rank-0 previews would wait forever for the others)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    ds = getattr(acc.state, "deepspeed_plugin", None)
    return ds is not None and acc.distributed_type == DistributedType.DEEPSPEED and ds.zero_stage == 3


def make_data(dargs: DataArguments, targs: TrainingArguments):
    """The training dataset (indexed or streamed) and whether it is a stream; an empty one is an error."""
    dataset = build_dataset(dargs.dataset, "train", seed=targs.seed, pairs_per_image=dargs.pairs_per_image,
                            shift_prob=dargs.shift_prob, data_files=dargs.data_files, streaming=dargs.streaming,
                            shuffle_buffer=dargs.shuffle_buffer)
    stream = getattr(dataset, "is_stream", False)
    if not stream and len(dataset) == 0:
        raise ValueError(f"{data_name(dargs)}: no records (an empty file?)")
    return dataset, stream


def make_loader(dataset, stream: bool, collator: Collator, dargs: DataArguments,
                targs: TrainingArguments) -> DataLoader:
    # a stream shuffles itself (seed, epoch) and yields (index, sample) pairs; its own generator also keeps
    # the loader's per-iterator seed draw off the global RNG, which checkpoints restore
    return DataLoader(dataset if stream else SafeDataset(dataset), batch_size=targs.batch_size,
                      shuffle=not stream, drop_last=True, collate_fn=collator, num_workers=dargs.num_workers,
                      generator=torch.Generator().manual_seed(targs.seed))


def data_name(dargs: DataArguments) -> str:
    """The data as a user named it: the file(s), or the built-in dataset."""
    files = dargs.data_files
    return ", ".join(files) if isinstance(files, (list, tuple)) else files or f"dataset {dargs.dataset!r}"


def check_batches(dataset, stream: bool, loader, dargs: DataArguments, targs: TrainingArguments) -> None:
    """An indexed dataset must give at least one optimizer step an epoch (``drop_last`` keeps full batches)."""
    if stream:
        return
    if len(loader) // targs.gradient_accumulation_steps == 0:
        raise ValueError(f"{data_name(dargs)}: {len(dataset)} record(s) make {len(loader)} full batch(es) of "
                         f"{targs.batch_size} a process, and one optimizer step takes "
                         f"{targs.gradient_accumulation_steps}; lower --batch_size (or --gradient_accumulation_steps) "
                         "or add records")


def sample_limit(model, dargs: DataArguments, acc: Accelerator) -> int:
    """The longest sample trained: ``max_length``, never past the backbone's positions (longer samples are
    dropped and counted by the collator)."""
    positions = getattr(model.config.backbone_config, "max_position_embeddings", None) or dargs.max_length
    if dargs.max_length > positions:
        acc.print(f"mmar: max_length {dargs.max_length} is past the backbone's {positions} positions; samples "
                  f"longer than {positions} tokens are dropped")
    return min(dargs.max_length, positions)


def prepare_output_dir(acc: Accelerator, targs: TrainingArguments) -> None:
    """A fresh run (no ``resume_from_checkpoint``) into a directory holding another run's checkpoints refuses
    to mix them in, unless ``overwrite_output_dir`` (which removes them)."""
    old = checkpoint_dirs(targs.output_dir)
    if targs.resume_from_checkpoint or not old:
        return
    if not targs.overwrite_output_dir:
        raise ValueError(f"{targs.output_dir}: holds another run's checkpoints ({', '.join(map(os.path.basename, old))}); "
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


def train_step(run: Run, batch: dict, targs: TrainingArguments):
    """Forward, backward and (at the end of an accumulation) the optimizer step on one loader batch.
    Returns the model output, or None when the loss was NaN / inf somewhere and the batch was skipped."""
    acc, model = run.acc, run.model
    with acc.accumulate(model):
        out = model(**batch)
        if not finite_everywhere(acc, out.loss):
            return skip_bad_batch(run, targs, f"loss is {out.loss.item()}")
        acc.backward(out.loss)
        if acc.sync_gradients:
            run.grad_norm = gradient_norm(run, targs)
            if checks_gradients(acc) and run.grad_norm is not None and not finite_everywhere(acc, run.grad_norm):
                return skip_bad_batch(run, targs, f"gradient norm is {float(run.grad_norm)} (loss {out.loss.item():.4g})")
            run.bad_in_a_row = 0
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
    return out


def gradient_norm(run: Run, targs: TrainingArguments):
    """The total gradient norm, clipped to ``max_grad_norm`` when it is set (measured without clipping when
    it is 0); None where DeepSpeed keeps the gradients (it clips them itself)."""
    if targs.max_grad_norm:
        return run.acc.clip_grad_norm_(run.model.parameters(), targs.max_grad_norm)
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def checks_gradients(acc: Accelerator) -> bool:
    """Whether a NaN / inf gradient norm skips the step here: not with an fp16 gradient scaler (it skips
    those steps itself and lowers its scale), nor under DeepSpeed (its engine has stepped already)."""
    from accelerate.utils import DistributedType

    return acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED


def skip_bad_batch(run: Run, targs: TrainingArguments, what: str) -> None:
    """A NaN / inf loss or gradient: drop the batch's gradients, count it, warn; ``max_bad_steps`` in a row
    stop the run. (With an fp16 gradient scaler, inf gradients are the scaler's to skip.)"""
    run.bad_in_a_row += 1
    run.bad_steps += 1
    run.opt.zero_grad(set_to_none=True)
    if run.bad_in_a_row >= targs.max_bad_steps:
        raise FloatingPointError(
            f"{run.bad_in_a_row} steps in a row had a NaN / inf loss or gradient (last at step {run.step + 1}: "
            f"{what}); stopping. Lower the learning rate, check the data, or resume from a checkpoint.")
    warnings.warn(f"step {run.step + 1}: {what}; skipping this batch ({run.bad_in_a_row} in a row, the run "
                  f"stops at {targs.max_bad_steps}; {run.bad_steps} skipped in all)")
    return None


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


def done(run: Run, targs: TrainingArguments) -> bool:
    """``max_steps`` reached, or early stopping says so."""
    return run.step >= targs.max_steps or (run.evaluator is not None and run.evaluator.stop)


def report_skipped(run: Run, epoch: int) -> None:
    """Say how many bad samples this epoch skipped, with a few reasons."""
    collator = run.collator
    if collator.skipped > run.skipped_before:
        run.acc.print(f"mmar: epoch {epoch}: skipped {collator.skipped - run.skipped_before} bad sample(s) "
                      f"({collator.skipped} in all); e.g. {'; '.join(dict.fromkeys(collator.reasons))}")
        run.skipped_before, collator.reasons = collator.skipped, []


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


def preview(model, processor, dataset, targs: TrainingArguments, name: str) -> None:
    """A grid of generated samples from the dataset's preview prompts, if it has any."""
    prompts = getattr(dataset, "preview_prompts", None)
    if prompts is None:
        return
    path = os.path.join(targs.output_dir, "samples", f"{name}.png")
    preview_grid(model, processor, prompts(), path, seed=targs.seed)
