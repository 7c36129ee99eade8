"""The state one training run holds (:class:`Run`): built by ``lifecycle.setup``, moved on by the loop's
steps, read by the step, reporting and checkpoint code. A leaf of ``mmar.training``, so that those modules
need not import the lifecycle that builds it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..data.registry import Collator
from ..sequence import MMARProcessor


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
