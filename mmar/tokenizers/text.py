"""Text tokenizers: a real Hugging Face tokenizer plus the multimodal special tokens.

A from-scratch model gets a small byte-level BPE trained on its dataset's
text with the ``tokenizers`` library; a pretrained backbone keeps its own
tokenizer. Either way :func:`add_modality_tokens` adds ``<|image_start|>``,
``<|image_end|>``, ``<|image|>`` (and the audio ones), and for an image tokenizer
with several sizes one size marker per size, ``<|image_8x12|>`` (height x width);
every id is read back from the tokenizer, none is hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers import PreTrainedTokenizerFast

from ..types import segment_modalities


def modality_tokens(modality: str) -> dict[str, str]:
    return {"start": f"<|{modality}_start|>", "end": f"<|{modality}_end|>", "token": f"<|{modality}|>"}


def size_token(modality: str, size: tuple[int, int]) -> str:
    """The marker of an item of ``size`` (height, width): ``<|image_8x12|>``."""
    return f"<|{modality}_{size[0]}x{size[1]}|>"


def marked_sizes(spec: Any) -> list[tuple[int, int]]:
    """The sizes that get a marker, from a tokenizer, a tokenizer spec ``{"name", "sizes", ...}`` or a
    modality spec ``{"tokenizer": ...}``: all of them when there are several, else none."""
    if isinstance(spec, Mapping) and "tokenizer" in spec:
        spec = spec["tokenizer"]
    sizes = spec.get("sizes") if isinstance(spec, Mapping) else getattr(spec, "sizes", None)
    sizes = [tuple(s) for s in sizes or []]
    return sizes if len(sizes) > 1 else []


def add_modality_tokens(tokenizer, modalities: Iterable[str] | Mapping | None = None) -> dict[str, dict[str, int]]:
    """Add the special tokens of each modality (default: every modality with a segment class); return
    their ids ``{modality: {start, end, token}}``. Given a mapping ``{modality: spec or tokenizer}`` (a
    training config's ``modalities``), also add the size markers of image tokenizers with several sizes
    (see :func:`size_token_ids`)."""
    specs = modalities if isinstance(modalities, Mapping) else {}
    modalities = segment_modalities() if modalities is None else list(modalities)
    new = [tok for m in modalities for tok in modality_tokens(m).values()]
    new += [size_token(m, s) for m, spec in specs.items() for s in marked_sizes(spec)]
    tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return modality_token_ids(tokenizer, modalities)


def size_token_ids(tokenizer, modality: str, sizes: Iterable[tuple[int, int]]) -> list[int]:
    """The ids of the size markers of ``sizes``, in order; a clear error when one is missing."""
    ids = []
    for size in sizes:
        tok = size_token(modality, size)
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"the text tokenizer has no {tok!r} size marker; call add_modality_tokens with the "
                             "modality specs (not only their names) first")
        ids.append(tid)
    return ids


def modality_token_ids(tokenizer, modalities: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    ids = {}
    for m in segment_modalities() if modalities is None else modalities:
        ids[m] = {}
        for key, tok in modality_tokens(m).items():
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the text tokenizer has no {tok!r} token; call add_modality_tokens first")
            ids[m][key] = tid
    return ids


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on ``texts`` and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|unk|>")
