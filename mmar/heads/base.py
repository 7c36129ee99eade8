"""The head interface and its registry.

A head turns a backbone hidden state (the condition) into the next token of
one modality: ``loss(cond, target) -> scalar`` in training and
``sample(cond, ...) -> tokens`` in generation. A new head is one file with a
subclass decorated by ``@register_head("name")``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..registry import Registry

_REGISTRY = Registry("head")


def register_head(name: str):
    """Class decorator: make a head available to configs under ``name``."""
    return _REGISTRY.register(name)


def available_heads() -> list[str]:
    return _REGISTRY.names()


def signature_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__``, in signature order (``**kwargs`` and required ones left out)."""
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def head_defaults(name: str) -> dict[str, Any]:
    """The default config of the registered head ``name``: ``{"name": name, **options}``, read off its
    class's signature (the one place a head's defaults are written), less its ``unsaved_options``."""
    cls = _REGISTRY.lookup(name)
    return {"name": name, **{k: v for k, v in signature_defaults(cls).items() if k not in cls.unsaved_options}}


def build_head(spec: dict[str, Any], cond_dim: int, token_dim: int | None = None,
               vocab_size: int | None = None) -> Head:
    """Continuous heads get ``token_dim``, discrete heads ``vocab_size``."""
    spec = dict(spec)
    cls = _REGISTRY.lookup(spec.pop("name", None))
    sizes = {"token_dim": token_dim} if vocab_size is None else {"vocab_size": vocab_size}
    return cls(cond_dim=cond_dim, **sizes, **spec)


class Head(nn.Module):
    name = ""
    # signature options :func:`head_defaults` leaves out of a config (so config.json keeps the keys it has had)
    unsaved_options: tuple[str, ...] = ()
    # False: the head draws guided tokens from the conditional branch alone (guidance distilled into it),
    # so the sampler runs no unconditional copy for it (half the backbone rows under CFG)
    needs_guidance_branch: bool = True

    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError
