"""Fine-tuned LoRA adapters as first-class model directories (peft underneath).

A directory written by ``mmar train --lora ...`` holds ``adapter_config.json`` +
``adapter_model.safetensors`` (and the processor, generation settings), not a full model. This module
finds its base (the adapter config's ``base_model_name_or_path``, or ``base/`` next to it), loads base +
adapter, and gives :class:`~mmar.pipeline.MMARPipeline` diffusers' adapter methods
(``load_lora_weights``, ``set_adapters``, ``disable_lora`` / ``enable_lora``, ``delete_adapters``,
``fuse_lora``, ``unload_lora_weights``) on top of peft's multi-adapter support, so one base in memory
serves several fine-tunes. Weights load from safetensors only.
"""

from __future__ import annotations

import json
import os

import torch

from .generation.config import GenerationDefaults

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    """An adapter directory: ``adapter_config.json`` and no full model (``config.json``) beside it."""
    d = os.fspath(directory)
    return os.path.isfile(os.path.join(d, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(d, "config.json"))


def adapter_base(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> str:
    """The base model directory of an adapter: ``base_dir`` if given, else the adapter config's
    ``base_model_name_or_path`` (as recorded, or relative to the adapter), else ``adapter_dir/base``."""
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}, not a LoRA adapter directory")
    if base_dir is not None:
        candidates = [os.fspath(base_dir)]
    else:
        try:
            with open(cfg_path) as f:
                recorded = json.load(f).get("base_model_name_or_path") or ""
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{cfg_path}: not a readable adapter config ({e})") from e
        candidates = [recorded, os.path.join(adapter_dir, recorded)] if recorded else []
        candidates.append(os.path.join(adapter_dir, "base"))  # `mmar train` saves a base it built here
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "config.json")):
            return c
    raise FileNotFoundError(f"{cfg_path}: base model not found (tried {', '.join(map(repr, candidates))}); "
                            "pass the base model directory")


def _check_weights(adapter_dir: str) -> None:
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (pickled adapters are not loaded)")


def load_peft_model(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, adapter_name: str = "default"):
    """``PeftModel.from_pretrained(MMARModel.from_pretrained(base), adapter_dir)``, safetensors only."""
    from peft import PeftModel

    from .modeling import MMARModel

    adapter_dir = os.fspath(adapter_dir)
    base = adapter_base(adapter_dir, base_dir)
    _check_weights(adapter_dir)
    model = MMARModel.from_pretrained(base, **({"dtype": dtype} if dtype is not None else {}))
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)


def load_adapter_pipeline(cls, directory: str | os.PathLike, device="cpu", dtype=torch.float32):
    """An :class:`MMARPipeline` (``cls``) over the adapter's base with the adapter loaded and active."""
    from .sequence import MMARProcessor

    directory = os.fspath(directory)
    peft_model = load_peft_model(directory, dtype=dtype)
    model = peft_model.get_base_model().to(device)  # peft injected the adapter into the base in place
    has_processor = any(f.startswith("tokenizer") for f in os.listdir(directory))
    processor = MMARProcessor.from_pretrained(directory if has_processor else adapter_base(directory))
    defaults = GenerationDefaults.from_pretrained(adapter_base(directory), GenerationDefaults.for_model(model.config))
    pipe = cls(model, processor, GenerationDefaults.from_pretrained(directory, defaults))
    pipe._peft = peft_model
    return pipe


def _restore_originals(model: torch.nn.Module) -> None:
    """Put each ``modules_to_save`` wrapper's original module back (peft's ``unload`` keeps the trained copy)."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.original_module)


class LoraLoaderMixin:
    """Adapter methods of :class:`~mmar.pipeline.MMARPipeline`, named as in diffusers' ``LoraLoaderMixin``.

    Adapters here carry their own heads and input projections (``modules_to_save``), so exactly one is
    active at a time; switching is instant, since all share the base weights held once in memory."""

    _peft = None

    def load_lora_weights(self, directory: str | os.PathLike, adapter_name: str | None = None) -> str:
        """Load an adapter trained on this pipeline's base and make it the active one; returns its name."""
        from peft import PeftModel

        from .sequence import MMARProcessor

        directory = os.fspath(directory)
        adapter_base(directory)  # a readable adapter config
        _check_weights(directory)
        names = self.get_list_adapters()
        adapter_name = adapter_name or f"default_{len(names)}"
        if adapter_name in names:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name")
        if any(f.startswith("tokenizer") for f in os.listdir(directory)):
            ids = MMARProcessor.from_pretrained(directory).token_ids
            if ids != self.processor.token_ids:
                raise ValueError(f"{directory}: this adapter was trained with other special-token ids "
                                 f"({ids}) than this pipeline's model ({self.processor.token_ids}); "
                                 "it belongs to another base model")
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, directory, adapter_name=adapter_name)
        else:
            self._peft.load_adapter(directory, adapter_name=adapter_name)
        self.set_adapters(adapter_name)
        self.model.eval()
        return adapter_name

    def get_list_adapters(self) -> list[str]:
        return list(self._peft.peft_config) if self._peft is not None else []

    def get_active_adapters(self) -> list[str]:
        return [self._peft.active_adapter] if self._peft is not None else []

    def set_adapters(self, adapter_names: str | list[str]) -> None:
        """Make one loaded adapter the active one (a one-item list is accepted, as in diffusers)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError("one adapter can be active at a time (each carries its own heads); "
                             f"got {names}. Merge adapters offline if you need a blend")
        if names[0] not in self.get_list_adapters():
            raise ValueError(f"no adapter named {names[0]!r}; loaded: {self.get_list_adapters() or 'none'}")
        self._peft.set_adapter(names[0], inference_mode=True)
        self._peft.base_model.enable_adapter_layers()

    def disable_lora(self) -> None:
        """Run the bare base model (adapters stay loaded; :meth:`enable_lora` switches them back on)."""
        if self._peft is not None:
            self._peft.base_model.disable_adapter_layers()

    def enable_lora(self) -> None:
        if self._peft is not None:
            self._peft.base_model.enable_adapter_layers()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.get_list_adapters():
                raise ValueError(f"no adapter named {name!r}; loaded: {self.get_list_adapters() or 'none'}")
            if len(self.get_list_adapters()) == 1:
                self.unload_lora_weights()
            else:
                self._peft.delete_adapter(name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and return to the base model's own weights."""
        if self._peft is None:
            return
        _restore_originals(self.model)
        self.model = self._peft.unload().eval()
        self._peft = None

    def fuse_lora(self) -> None:
        """Merge the active adapter into the weights (a plain model again, as fast as the base)."""
        if self._peft is None:
            raise ValueError("no LoRA adapter is loaded")
        self.model = self._peft.merge_and_unload().eval()
        self._peft = None

    def save_lora_weights(self, directory: str | os.PathLike) -> None:
        """Write the active adapter as an adapter directory (loads with ``MMARPipeline.from_pretrained``)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self._peft is None:
            raise ValueError("no LoRA adapter is loaded")
        name = self._peft.active_adapter
        os.makedirs(directory, exist_ok=True)
        state = get_peft_model_state_dict(self._peft, adapter_name=name)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, ADAPTER_WEIGHTS))
        self._peft.peft_config[name].save_pretrained(directory)
        self.processor.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)
