"""The modality-tokenizer interface and its registry.

A modality tokenizer turns raw items of one modality (images, audio) into
tokens the backbone reads and back. Continuous tokenizers give float tensors
``[num_tokens, token_dim]`` (targets of a diffusion head); discrete ones give
code ids ``[num_tokens]`` (targets of a codebook head).

A new tokenizer is one file that subclasses :class:`ModalityTokenizer` and is
decorated with ``@register_tokenizer("name")``; configs pick it by that name.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch

from ..registry import Registry

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
_REGISTRY = Registry("tokenizer", unique=True)


def register_tokenizer(name: str):
    """Class decorator: make a tokenizer available to configs under ``name``."""
    return _REGISTRY.register(name)


def available_tokenizers() -> list[str]:
    return _REGISTRY.names()


def build_tokenizer(spec: dict[str, Any]) -> ModalityTokenizer:
    """Build a tokenizer from a config dict ``{"name": ..., **kwargs}``, or load a saved (e.g. trained)
    one with ``{"path": DIR}``."""
    spec = dict(spec)
    if "path" in spec:
        if len(spec) > 1:
            raise ValueError(f"a tokenizer given by path takes no other options, got {sorted(spec)}")
        return ModalityTokenizer.from_pretrained(spec["path"])
    return _REGISTRY.lookup(spec.pop("name", None))(**spec)


def resolve_path(spec: dict[str, Any], key: str, directory: str | os.PathLike) -> dict[str, Any]:
    """A copy of a saved ``spec`` whose ``key`` (a file or folder saved with the tokenizer), when relative,
    is taken inside ``directory``."""
    spec = dict(spec)
    if spec.get(key) and not os.path.isabs(spec[key]):
        spec[key] = os.path.join(directory, spec[key])
    return spec


class ModalityTokenizer:
    """Base class. Subclasses set ``modality`` and ``kind`` and implement the four methods."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    kind: ClassVar[str] = "continuous"  # or "discrete"
    can_decode: ClassVar[bool] = True

    token_dim: int | None = None  # continuous tokens
    vocab_size: int | None = None  # discrete tokens
    # image tokenizers: the (height, width) sizes an item may have, the default first. With more than one the
    # sequence says which after <|image_start|> (see mmar.sequence) and decode() needs the size.
    sizes: list[tuple[int, int]] | None = None

    def config(self) -> dict[str, Any]:
        """The kwargs that rebuild this tokenizer (plus its registry name)."""
        raise NotImplementedError

    def num_tokens(self, item: Any = None) -> int:
        """How many tokens ``item`` becomes (fixed-size tokenizers ignore ``item``)."""
        raise NotImplementedError

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Validate and convert one raw item to a tensor; raise ``ValueError`` naming the problem."""
        raise NotImplementedError

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed items ``[B, ...]`` -> tokens ``[B, num_tokens, token_dim]`` (or ``[B, num_tokens]``)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> Any:
        """Tokens ``[B, num_tokens, ...]`` -> a list of raw items (image tokenizers take ``size=(h, w)``)."""
        raise NotImplementedError

    def size_of(self, item: torch.Tensor) -> tuple[int, int] | None:
        """The ``(height, width)`` of a preprocessed item, for tokenizers whose items vary in size."""
        return None

    @property
    def marks_size(self) -> bool:
        """Whether items of several sizes occur, so the sequence carries a size marker."""
        return bool(self.sizes) and len(self.sizes) > 1

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.write_config(directory)

    def write_config(self, directory: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
        """``directory/tokenizer_config.json``: the registry name and ``config`` (default: :meth:`config`),
        what :meth:`from_pretrained` rebuilds the tokenizer from."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_CONFIG_NAME), "w") as f:
            json.dump({"name": self.name, **(self.config() if config is None else config)}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ModalityTokenizer:
        path = os.path.join(directory, TOKENIZER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no modality tokenizer config here")
        with open(path) as f:
            spec = json.load(f)
        return _REGISTRY.lookup(spec.pop("name", None), where=f"{path}: ").from_config(spec, directory)

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> ModalityTokenizer:
        """Rebuild from a saved config; tokenizers with weights resolve them inside ``directory``."""
        return cls(**spec)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
