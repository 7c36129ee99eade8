"""The training data as batches: the dataset (indexed or streamed), its DataLoader, the checks that it
gives full batches, and the longest sample trained."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..data.registry import Collator, SafeDataset, build_dataset
from .arguments import DataArguments, TrainingArguments


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
