"""The head interface and its registry.

A head turns a backbone hidden state (the condition) into the next token of
one modality: ``loss(cond, target) -> scalar`` in training and
``sample(cond, ...) -> tokens`` in generation. A new head is one file with a
subclass decorated by ``@register_head("name")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, type[Head]] = {}


def register_head(name: str):
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_heads() -> list[str]:
    return sorted(_REGISTRY)


def build_head(spec: dict[str, Any], cond_dim: int, token_dim: int | None = None,
               vocab_size: int | None = None) -> Head:
    """Continuous heads get ``token_dim``, discrete heads ``vocab_size``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown head {name!r}; registered: {', '.join(available_heads())}")
    sizes = {"token_dim": token_dim} if vocab_size is None else {"vocab_size": vocab_size}
    return _REGISTRY[name](cond_dim=cond_dim, **sizes, **spec)


class Head(nn.Module):
    name = ""

    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError
