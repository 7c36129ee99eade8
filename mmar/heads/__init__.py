"""Heads, chosen by name in a config (see :mod:`mmar.heads.base`). The LM head is the backbone's."""

from .base import Head, available_heads, build_head, head_defaults, register_head
from .codebook import CodebookHead
from .continuous import ContinuousHead, SimpleMLPAdaLN
from .diffusion import DiffusionHead
from .fewstep import FewStepHead
from .flow import FlowHead

__all__ = ["Head", "CodebookHead", "ContinuousHead", "DiffusionHead", "FewStepHead", "FlowHead", "SimpleMLPAdaLN",
           "available_heads", "build_head", "head_defaults", "register_head"]
