"""The generation settings: one validated object for every sampling argument.

:class:`GenerationDefaults` is what ``pipe(...)`` uses for every argument left out and what
``generate()`` builds from its keyword arguments; it is saved as ``generation_config.json`` next to the
model. Values are checked once, here, when the object is built (``__post_init__`` also runs on
``dataclasses.replace``), so a bad temperature or step count is a clear ``ValueError`` naming the
argument instead of a shape or probability error deep inside the sampler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass

GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_GUIDANCE = 3.0  # used when the model was trained with condition dropout (so CFG has a branch to use)
CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def _integer(name: str, value, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _number(name: str, value, low: float | None = None, high: float | None = None, *,
            low_open: bool = False) -> None:
    """A finite real number in [low, high] (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass
class GenerationDefaults:
    """Sampling settings. Key names follow transformers' ``GenerationConfig`` where one exists
    (``temperature``, ``top_p``, ``guidance_scale``, ``use_cache``, ``cache_implementation``,
    ``prefill_chunk_size``, ...)."""

    max_new_tokens: int = 64  # text tokens per row (items do not count)
    temperature: float = 1.0  # of text tokens; 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    guidance_scale: float = 1.0  # classifier-free guidance of items; 1 = off (with dual guidance: the text's)
    image_guidance_scale: float | None = None  # dual guidance (editing): the prompt's items' scale; None = off
    image_temperature: float = 1.0  # scales the heads' initial noise (or logits, for codebook heads)
    num_inference_steps: int | None = None  # None: the head's own setting
    max_items: int = 4  # images / audio clips per row
    min_new_tokens: int = 0  # EOS is banned before this many text tokens
    use_cache: bool = True
    cache_implementation: str = "dynamic"  # "static": a KV cache preallocated for the limit (fixed shapes)
    compile: bool = False  # torch.compile the backbone's decode step (needs the static cache)
    prefill_chunk_size: int = 1024  # prompt tokens per prefill call (memory linear in the length); 0: all

    def __post_init__(self):
        _integer("max_new_tokens", self.max_new_tokens, 0)
        _integer("min_new_tokens", self.min_new_tokens, 0)
        _integer("max_items", self.max_items, 0)
        _integer("top_k", self.top_k, 0)
        _integer("num_inference_steps", self.num_inference_steps, 1, optional=True)
        _number("temperature", self.temperature, 0.0)
        _number("image_temperature", self.image_temperature, 0.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("guidance_scale", self.guidance_scale)
        if self.image_guidance_scale is not None:
            _number("image_guidance_scale", self.image_guidance_scale)
        _integer("prefill_chunk_size", self.prefill_chunk_size, 0)
        self._check_cache()

    def _check_cache(self) -> None:
        for name in ("use_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, "
                             f"got {self.cache_implementation!r}")
        if self.compile and (self.cache_implementation != "static" or not self.use_cache):
            raise ValueError("compile=True needs use_cache=True and cache_implementation='static' "
                             "(a compiled step needs fixed shapes)")

    def check_mode(self, mode: str) -> None:
        """Settings that only make sense together with the generation ``mode``."""
        if mode not in ("auto", "text") and self.max_items < 1:
            raise ValueError(f"max_items must be >= 1 with mode={mode!r} (the prompt opens an item), "
                             f"got {self.max_items}")

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def replace(self, **changes) -> GenerationDefaults:
        """A validated copy with ``changes`` (``None`` values mean "keep"); unknown names are an error."""
        unknown = sorted(set(changes) - self.fields())
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; known: {sorted(self.fields())}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def for_model(cls, config, **overrides) -> GenerationDefaults:
        """Neutral defaults, with CFG on when the model learned an unconditional branch; ``overrides``
        (e.g. a training config's ``generation`` section) replace them."""
        unknown = sorted(set(overrides) - cls.fields())
        if unknown:
            raise ValueError(f"unknown generation setting(s) {unknown}; known: {sorted(cls.fields())}")
        cfg_ok = getattr(config, "cond_dropout_prob", 0.0) > 0 and bool(getattr(config, "modalities", None))
        return dataclasses.replace(cls(guidance_scale=DEFAULT_GUIDANCE if cfg_ok else 1.0), **overrides)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        base: GenerationDefaults | None = None) -> GenerationDefaults:
        """``base`` updated with ``directory/generation_config.json`` when that file exists."""
        base = base or cls()
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return base
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of generation settings")
        known = cls.fields()
        unknown = sorted(k for k in data if k not in known and k != "transformers_version" and not k.startswith("_"))
        if unknown:
            warnings.warn(f"{path}: ignoring unknown generation settings {unknown}", stacklevel=2)
        try:
            return dataclasses.replace(base, **{k: v for k, v in data.items() if k in known})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
