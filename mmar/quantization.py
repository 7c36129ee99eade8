"""Quantized backbones: QLoRA fine-tuning on a 4- / 8-bit base, and int8 weight-only inference.

Through transformers' quantization configs, so any backend transformers knows works when it is
installed. The default backend is optimum-quanto (``pip install 'mmar[quantization]'``), chosen
because it is the one of the three tried that does everything here on CPU as well as on GPU:

- optimum-quanto 0.2.7: int4 and int8 weight-only; peft's LoRA trains on its ``QLinear``; adapters
  reload and merge. Used.
- bitsandbytes 0.50.2 (CPU backend): 4-bit loads and runs forward, but LoRA on it does not train on
  CPU (the loss stays identical step after step; torch warns that ``bitsandbytes::gemv_4bit`` has no
  autograd kernel). On a GPU pass your own ``BitsAndBytesConfig`` as ``quantization``.
- torchao 0.18: int8 weight-only + LoRA works, int4 on CPU does not (``Unsupported int4 packing
  format``), and once installed transformers imports it in every process (~4 s, warnings).

Only the backbone's linear layers are quantized: the LM head, the input projections, position
embeddings and the modality heads stay in full precision (they are trained in full under LoRA,
``modules_to_save``, and they are small).
"""

from __future__ import annotations

from typing import Any

KEEP_FULL_PRECISION = ["lm_head", "projections", "heads", "pos_embeds"]
SHORT_NAMES = {"int8": "int8", "8bit": "int8", "int4": "int4", "4bit": "int4"}
EXTRA = "pip install 'mmar[quantization]'"


def quantization_config(spec: Any):
    """A transformers quantization config from ``spec``: ``"int8"`` / ``"int4"`` (optimum-quanto weight-only),
    a dict ``{weights: int4, ...}`` (QuantoConfig's options), or a transformers config object, passed through."""
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if spec is None or isinstance(spec, QuantizationConfigMixin):
        return spec
    if isinstance(spec, str):
        if spec.lower() not in SHORT_NAMES:
            raise ValueError(f"quantization: unknown {spec!r}; use int8 or int4 (weight-only, optimum-quanto), "
                             "a dict of QuantoConfig options, or a transformers quantization config")
        spec = {"weights": SHORT_NAMES[spec.lower()]}
    if not isinstance(spec, dict):
        raise TypeError(f"quantization: expected a string, a dict or a transformers quantization config, "
                        f"got {type(spec).__name__}")
    if not _have_quanto():
        raise ImportError(f"quantization {spec} needs optimum-quanto: {EXTRA}")
    from transformers import QuantoConfig

    options = {"modules_to_not_convert": KEEP_FULL_PRECISION, **spec}
    try:
        return QuantoConfig(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"quantization {spec}: {e}") from e


def _have_quanto() -> bool:
    import importlib.util

    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def load_quantized(directory: str, spec: Any, **kwargs):
    """``MMARModel.from_pretrained(directory)`` with its backbone quantized as ``spec`` says, holding no
    page of the checkpoint file (:func:`release_checkpoint_file`)."""
    from .modeling import MMARModel

    model = MMARModel.from_pretrained(directory, quantization_config=quantization_config(spec), **kwargs)
    release_checkpoint_file(model)
    return model


def release_checkpoint_file(model) -> None:
    """Copy the model's unquantized tensors into memory of their own. transformers loads safetensors as a
    memory map and the full-precision tensors it keeps (embeddings, LM head, modality heads) are views of
    it, so the whole mapping stays alive: every page read while quantizing stays resident (measured on the
    88M model: 326 MB of fp32 file pages beside 91 MB of int8 weights). After the copy the mapping is
    unreferenced and unmapped; the quantized tensors already own their memory."""
    import gc

    import torch

    with torch.no_grad():
        for module in model.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for _, t in tensors:
                if type(t) in (torch.nn.Parameter, torch.Tensor) and t.device.type == "cpu":
                    t.data = t.data.clone()
    gc.collect()


def is_quantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)


def weight_bytes(model) -> int:
    """Bytes the model's weights take (a quantized tensor subclass counts its packed inner tensors)."""
    return sum(_storage_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def _storage_bytes(t) -> int:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_storage_bytes(getattr(t, n)) for n in names)
