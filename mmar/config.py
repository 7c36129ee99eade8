"""MMARConfig: a transformers config with the backbone as a sub-config, and the typed per-modality spec.

Everything needed to rebuild the model lives here as plain data: the
backbone's own config, and for each non-text modality a :class:`ModalitySpec`
(its tokenizer spec, its head spec, the ids of its special tokens read from the
text tokenizer, and the sizes the model is built with). ``config.json`` holds
each spec as a plain dict with the same keys as before the spec was typed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .heads import head_defaults

DEFAULT_HEAD = "diffusion"  # the head of a continuous modality whose spec names none
# its default config, read off the head class's signature (kept under this name for old imports)
DEFAULT_DIFFUSION_HEAD: dict[str, Any] = head_defaults(DEFAULT_HEAD)


@dataclass
class ModalitySpec:
    """How the model handles one modality. ``token_ids``, ``num_tokens`` and the sizes are filled in by
    :func:`mmar.modeling.build_model` from the tokenizers; a spec written by hand needs only ``tokenizer``."""

    tokenizer: dict[str, Any]  # {"name": ..., **options} of a registered tokenizer, or {"path": DIR}
    head: dict[str, Any] = field(default_factory=dict)  # {"name": ..., **options} of a registered head
    token_ids: dict[str, int] = field(default_factory=dict)  # {"start", "end", "token"}
    num_tokens: int | None = None  # tokens per item
    token_dim: int | None = None  # continuous tokens: values per token
    vocab_size: int | None = None  # discrete tokens: codebook size
    can_generate: bool = True  # False: understanding only (no head; its tokenizer cannot decode)
    # items of several sizes (image tokenizers with ``sizes``): each [height, width], its token grid
    # [rows, cols] and the id of its size marker, in the tokenizer's order (default size first)
    sizes: list[list[int]] | None = None
    grids: list[list[int]] | None = None
    size_token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of a saved spec, kept as they are

    @property
    def kind(self) -> str:
        """``"discrete"`` (codes: an embedding in, a codebook head out) or ``"continuous"``."""
        return "discrete" if self.vocab_size else "continuous"

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | ModalitySpec) -> ModalitySpec:
        if isinstance(spec, ModalitySpec):
            return dataclasses.replace(spec, head=dict(spec.head), token_ids=dict(spec.token_ids))
        if not isinstance(spec, dict) or "tokenizer" not in spec:
            raise ValueError("each modality needs a 'tokenizer' spec, e.g. {'name': 'image-patch'}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in spec.items() if k in known},
                   extra={k: v for k, v in spec.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form: the keys a saved model has always had (no sizes that are unset;
        ``can_generate`` only for continuous modalities, as :func:`build_model` wrote it)."""
        out = {"tokenizer": self.tokenizer, "head": self.head, "token_ids": self.token_ids}
        sizes = {k: getattr(self, k) for k in ("num_tokens", "token_dim", "vocab_size", "sizes", "grids",
                                               "size_token_ids")}
        out.update({k: v for k, v in sizes.items() if v is not None})
        if self.kind == "continuous" and (self.token_dim is not None or not self.can_generate):
            out["can_generate"] = self.can_generate
        return {**out, **self.extra}

    def __getitem__(self, key: str) -> Any:
        """Read access by the old dict keys (``spec["head"]``), for code written before the spec was typed."""
        value = self.to_dict().get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


_MISSING = object()


class MMARConfig(PreTrainedConfig):
    r"""
    Args:
        backbone_config: config (or dict with ``model_type``) of any ``AutoModelForCausalLM``.
        modalities: ``{modality: ModalitySpec}``, or the same as dicts
            ``{modality: {"tokenizer": {...}, "head": {...}, "token_ids": {start, end, token}}}``.
            ``token_ids`` are filled in from the text tokenizer by :func:`mmar.modeling.build_model`.
        diffusion_loss_weight: lambda in ``loss = text CE + lambda * diffusion loss``.
        cond_dropout_prob: share of generation prompts emptied in training, so CFG has an
            unconditional branch to use.
        image_pos_embed: add a learned embedding of the index within an image to its tokens.
    """

    model_type = "mmar"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    backbone_config: dict | PreTrainedConfig | None = None
    modalities: dict[str, ModalitySpec] | None = None
    diffusion_loss_weight: float = 1.0
    cond_dropout_prob: float = 0.1
    pos_embed: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.modalities = {m: self._fill(spec) for m, spec in (self.modalities or {}).items()}
        self.tie_word_embeddings = bool(getattr(self.backbone_config, "tie_word_embeddings", False))

    @staticmethod
    def _fill(spec: dict | ModalitySpec) -> ModalitySpec:
        spec = ModalitySpec.from_dict(spec)
        if spec.head.get("name", DEFAULT_HEAD) == DEFAULT_HEAD:
            spec.head = {**head_defaults(DEFAULT_HEAD), **spec.head}
        return spec

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["modalities"] = {m: s.to_dict() if isinstance(s, ModalitySpec) else s
                             for m, s in (out.get("modalities") or {}).items()}
        return out

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    def placeholder_ids(self) -> dict[str, int]:
        return {m: spec.token_ids["token"] for m, spec in self.modalities.items()}


AutoConfig.register("mmar", MMARConfig)
