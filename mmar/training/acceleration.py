"""How a run is accelerated: the Accelerator (mixed precision, processes, DeepSpeed options) and its checks,
regional ``torch.compile``, gradient checkpointing, and whether the weights are sharded over processes."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from .arguments import TrainingArguments


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

    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and acc.distributed_type != DistributedType.FSDP:
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
