"""LoRA for MMAR models through peft.

Adapters go on the backbone's linear layers (and its LM head); the input
projections, position embeddings and heads are trained in full
(``modules_to_save``); the rows of the new special tokens in the embedding
table and the LM head are trainable (``trainable_token_indices``). The adapter
directory loads with plain ``PeftModel.from_pretrained`` and merges with
``merge_and_unload``.
"""

from __future__ import annotations

import os

from ..modeling import MMARModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def lora_config(model: MMARModel, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS, train_new_tokens: bool = True):
    from peft import LoraConfig

    names = "|".join(sorted(set(target_modules)))
    saved = [f"{kind}.{m}" for m in model.config.modalities for kind in ("projections", "heads", "pos_embeds")
             if m in getattr(model, kind)]
    new_ids = sorted({i for spec in model.config.modalities.values()
                      for i in [*spec.token_ids.values(), *(spec.size_token_ids or [])]})  # + size markers
    tokens = None
    if train_new_tokens and new_ids:
        tokens = {"embed_tokens": new_ids}
        if "lm_head" not in target_modules:
            tokens["lm_head"] = new_ids
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=rf"backbone\..*({names})$",
                      modules_to_save=saved, trainable_token_indices=tokens)


def apply_lora(model: MMARModel, spec: dict, base_path: str | None = None):
    """Wrap ``model`` with LoRA adapters described by ``spec`` (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
    from peft import get_peft_model

    unknown = set(spec) - {"r", "alpha", "dropout", "target_modules", "train_new_tokens"}
    if unknown:
        raise ValueError(f"lora: unknown option(s) {', '.join(sorted(unknown))}; "
                         "known: r, alpha, dropout, target_modules, train_new_tokens")
    config = lora_config(model, **spec)
    if base_path:  # peft records the base as the model's name_or_path
        model.name_or_path = model.config._name_or_path = os.path.abspath(base_path)
    return get_peft_model(model, config)


def load_adapter(adapter_dir: str, base_dir: str | None = None):
    """``PeftModel.from_pretrained(MMARModel.from_pretrained(base), adapter_dir)``; ``base`` defaults to
    the adapter config's ``base_model_name_or_path``, then ``adapter_dir/base`` (see mmar/adapters.py)."""
    from ..adapters import load_peft_model

    return load_peft_model(adapter_dir, base_dir)


def merge_lora(adapter_dir: str, output_dir: str, base_dir: str | None = None) -> str:
    """Merge an adapter into its base and write a plain MMAR model directory (with the processor)."""
    from ..sequence import MMARProcessor

    merged = load_adapter(adapter_dir, base_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    MMARProcessor.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return output_dir
