"""MMARConfig: a transformers config with the backbone as a sub-config.

Everything needed to rebuild the model lives here as plain data: the
backbone's own config, and for each non-text modality its tokenizer spec, its
head spec and the ids of its special tokens (read from the text tokenizer).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

DEFAULT_DIFFUSION_HEAD: dict[str, Any] = {
    "name": "diffusion",
    "width": 256,  # MLP width of SimpleMLPAdaLN
    "depth": 3,  # residual AdaLN blocks
    "prediction_type": "v_prediction",  # or "epsilon"
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",  # cosine, as in MAR
    "diffusion_batch_mul": 4,  # noise draws per token in training
    "scheduler": "DDIMScheduler",  # any diffusers scheduler class name for sampling
    "num_inference_steps": 50,
}


class MMARConfig(PreTrainedConfig):
    r"""
    Args:
        backbone_config: config (or dict with ``model_type``) of any ``AutoModelForCausalLM``.
        modalities: ``{modality: {"tokenizer": {...}, "head": {...}, "token_ids": {start, end, token}}}``.
            ``token_ids`` are filled in from the text tokenizer by :func:`mmar.modeling.build_model`.
        diffusion_loss_weight: lambda in ``loss = text CE + lambda * diffusion loss``.
        cond_dropout_prob: share of generation prompts emptied in training, so CFG has an
            unconditional branch to use.
        image_pos_embed: add a learned embedding of the index within an image to its tokens.
    """

    model_type = "mmar"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    backbone_config: dict | PreTrainedConfig | None = None
    modalities: dict | None = None
    diffusion_loss_weight: float = 1.0
    cond_dropout_prob: float = 0.1
    pos_embed: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.modalities = {m: self._fill(spec) for m, spec in (self.modalities or {}).items()}
        self.tie_word_embeddings = bool(getattr(self.backbone_config, "tie_word_embeddings", False))

    @staticmethod
    def _fill(spec: dict) -> dict:
        spec = dict(spec)
        if "tokenizer" not in spec:
            raise ValueError("each modality needs a 'tokenizer' spec, e.g. {'name': 'image-patch'}")
        head = dict(spec.get("head", {}))
        if head.get("name", "diffusion") == "diffusion":
            head = {**DEFAULT_DIFFUSION_HEAD, **head}
        spec["head"] = head
        spec.setdefault("token_ids", {})
        return spec

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    def placeholder_ids(self) -> dict[str, int]:
        return {m: spec["token_ids"]["token"] for m, spec in self.modalities.items()}


AutoConfig.register("mmar", MMARConfig)
