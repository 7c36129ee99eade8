"""What a run trains and with what: the text tokenizer, the model and processor (built, or loaded from
``init_from``, optionally quantized), its LoRA wrapping, and the AdamW optimizer over its parameter groups."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from ..modeling import build_model
from ..sequence import MMARProcessor
from ..tokenizers import add_modality_tokens, build_tokenizer, train_bpe_tokenizer
from .arguments import ModelArguments


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
