"""Training arguments: plain dataclasses shared by the CLI and the Python API.

YAML through ``--config`` sets values, command-line flags override them (TRL's
convention); unknown keys are errors. Dict-valued options take YAML/JSON on
the command line, e.g. ``--backbone '{hidden_size: 128}'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import DEFAULT_HEAD
from ..heads import head_defaults


def _default_modalities() -> dict:
    """Digits as 2x2 pixel patches with the default head's own defaults (read from the head registry)."""
    return {"image": {"tokenizer": {"name": "image-patch", "image_size": 8, "patch_size": 2, "channels": 1},
                      "head": head_defaults(DEFAULT_HEAD)}}


@dataclass
class ModelArguments:
    backbone: dict = field(default_factory=lambda: {
        "model_type": "llama", "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 512, "max_position_embeddings": 256})
    """Config of an AutoModelForCausalLM to train from scratch (``model_type`` + kwargs)."""
    backbone_path: str | None = None
    """Local pretrained AutoModelForCausalLM directory; overrides ``backbone``."""
    init_from: str | None = None
    """A saved MMAR model directory to fine-tune (its tokenizers and modalities are kept)."""
    quantization: str | None = None
    """With ``init_from`` and ``lora``: load the base's backbone quantized, ``int4`` / ``int8`` (QLoRA,
    optimum-quanto; see mmar/quantization.py)."""
    lora: dict | None = None
    """LoRA on the backbone, e.g. ``{r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}``."""
    text_tokenizer: str | None = None
    """Local tokenizer directory; default: the backbone's, or a BPE trained on the dataset's text."""
    text_vocab_size: int = 512
    modalities: dict = field(default_factory=_default_modalities)
    diffusion_loss_weight: float = 1.0
    cond_dropout_prob: float = 0.1
    cond_item_dropout_prob: float = 0.0
    """Editing data: the share of samples with an input image whose whole prompt, image too, is dropped
    (the ``none`` branch of dual guidance, InstructPix2Pix's 5%); ``cond_dropout_prob`` drops the text only."""
    attn_implementation: str = "sdpa"


@dataclass
class DataArguments:
    dataset: str = "digits"
    """Built in: ``digits``, ``shapes``, ``spoken-digits`` (needs espeak-ng); or ``jsonl`` (your chat
    records, see mmar/training/jsonl.py)."""
    data_files: str | None = None
    """For ``jsonl``: a .jsonl / .json / .parquet file; media paths are relative to it."""
    streaming: bool = False
    """For ``jsonl``: stream the records through HF ``datasets`` instead of indexing them (large sets)."""
    shuffle_buffer: int = 1000
    """With ``streaming``: records in the shuffle buffer (order a function of seed and epoch)."""
    eval_data_files: str | None = None
    """Held-out chat records (a JSONL like ``data_files``) for the evaluation every ``eval_steps``."""
    eval_split: float = 0.0
    """Hold out this fraction of the training data (e.g. 0.1; a fixed slice drawn with ``seed``) for the
    evaluation, and do not train on it. Not with ``streaming`` or ``eval_data_files``."""
    packing: bool = False
    """Pack samples into rows of ``max_length`` tokens (block-diagonal attention) instead of padding."""
    max_length: int = 256
    pairs_per_image: float = 0.5
    shift_prob: float = 0.0
    """digits: chance that an image-to-text input is shifted by one pixel (augmentation)."""
    num_workers: int = 0


@dataclass
class TrainingArguments:
    output_dir: str = "runs/digits"
    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 64
    """Samples per loader batch and process."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    """AdamW's peak learning rate, reached after ``warmup_steps``."""
    weight_decay: float = 0.05
    """AdamW's, on weight matrices only (not on biases, norms or position embeddings)."""
    adam_beta2: float = 0.95
    warmup_steps: int = 100
    """Linear warm-up, then cosine decay to ``min_lr_ratio * learning_rate`` at ``max_steps``."""
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the total gradient norm to this (0: no clipping; the norm is still measured and logged)."""
    max_bad_steps: int = 5
    """A step whose loss is NaN / inf is skipped with a warning; this many in a row abort the run."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (e.g. 0.999) and save it as the final model."""
    mixed_precision: str | None = None
    """``no`` / ``bf16`` / ``fp16`` (GPU only) / ``fp8``; unset: the launcher's (``accelerate launch
    --mixed_precision`` or its config file, read from ``ACCELERATE_MIXED_PRECISION``), else ``no``. The
    precision the run really uses is printed and saved in ``output_dir/training_args.json``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: the backbone's decoder layers
    (its ``activation_checkpointing_enable``, use_reentrant=False) and each block of the diffusion / flow
    heads. Less memory, about one more forward pass of compute; the same losses and gradients."""
    torch_compile: bool = False
    """Compile the model with torch.compile (inductor, through accelerate) before training."""
    logging_steps: int = 10
    """A row of ``output_dir/log.jsonl`` every N optimizer steps and at the last."""
    save_steps: int = 500
    """A checkpoint (``output_dir/checkpoints/step_N``, safetensors + JSON) every N steps (0: none)."""
    save_total_limit: int = 2
    """Checkpoints kept, the newest (0: all)."""
    eval_steps: int = 0
    """With held-out data: the eval loss every N steps and at the end (0: every ``logging_steps``)."""
    eval_batch_size: int = 0
    """Rows per eval batch and process (0: ``batch_size``)."""
    eval_generate: int = 0
    """At each eval, greedy answers to the first N held-out samples with text answers: exact-match and
    contains accuracy in the log (mmar/eval/jsonl.py's scoring)."""
    load_best_model_at_end: bool = False
    """Save the weights of the eval with the lowest eval loss as the final model (kept in
    ``output_dir/best`` during the run)."""
    early_stopping_patience: int = 0
    """Stop when this many evals in a row did not lower the eval loss (0: never)."""
    sample_steps: int = 0
    """Write a sample grid every N steps (0: only at the end)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory, or ``latest`` (the newest complete one under ``output_dir``)."""
    overwrite_output_dir: bool = False
    """A fresh run into an ``output_dir`` that holds another run's checkpoints removes them (else: an error)."""
    num_threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    progress: bool = True
    log_with: str | None = None
    """An accelerate tracker, e.g. ``tensorboard`` (needs the package)."""
    generation: dict = field(default_factory=dict)
    """Sampling defaults saved with the model (``generation_config.json``), used by the pipeline, chat, demo
    and ``mmar eval`` when an argument is left out, e.g. ``{guidance_scale: 2.0, image_temperature: 0.7}``."""


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments)


def _field_type(f: dataclasses.Field) -> type:
    t = f.type
    if isinstance(t, str):
        t = eval(t, {"dict": dict, "str": str, "int": int, "float": float, "bool": bool, "None": None})  # noqa: S307
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _parse_dict(s: str) -> dict:
    value = yaml.safe_load(s)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML/JSON mapping, got {s!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, classes=ALL_ARGUMENTS) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below; flags override it")
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            t = _field_type(f)
            conv = {bool: _parse_bool, dict: _parse_dict}.get(t, t)
            group.add_argument(f"--{f.name}", type=conv, default=None, metavar=t.__name__.upper())


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of option: value")
    return data


def build_arguments(values: dict[str, Any], classes=ALL_ARGUMENTS, source: str = "config") -> tuple:
    """Split a flat ``{option: value}`` mapping into the dataclasses; unknown keys are errors."""
    known = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return tuple(cls(**{k: v for k, v in values.items() if known[k] is cls}) for cls in classes)


def parse_arguments(ns: argparse.Namespace, classes=ALL_ARGUMENTS) -> tuple:
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    source = ns.config if getattr(ns, "config", None) else "arguments"
    flags = {k: v for k, v in vars(ns).items() if v is not None and k not in ("config", "command", "func")}
    return build_arguments({**values, **flags}, classes, source)
