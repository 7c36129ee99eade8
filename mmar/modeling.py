"""MMARModel: a causal LLM backbone + input projections + per-modality heads.

Text is embedded by the backbone's embedding table; continuous tokens are
projected by a small MLP and scattered into ``inputs_embeds`` at their
placeholder positions (LLaVA's ``masked_scatter``). The hidden state at ``t``
conditions the prediction of token ``t + 1``: LM logits only where that token
is text, the modality's head where it is a continuous token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .compat import CACHE
from .config import MMARConfig, ModalitySpec
from .heads import build_head
from .sequence import IGNORE, grid_positions
from .tokenizers import ModalityTokenizer, build_tokenizer, marked_sizes, modality_token_ids, size_token_ids


@dataclass
class MMAROutput(ModelOutput):
    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    modality_losses: dict | None = None
    hidden_states: torch.Tensor | None = None
    cache: object | None = None  # the backbone's KV cache (``use_cache=True``)


class MMARPreTrainedModel(PreTrainedModel):
    config_class = MMARConfig
    base_model_prefix = "mmar"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def init_own_weights_everywhere(self) -> None:
        """After transformers' default init (which redraws every Linear of the heads too), each module's
        own ``init_own_weights``, so that a head or projection keeps the initialisation it sets without this
        file naming it. transformers 5 counts MMARModel as custom code and never calls ``_init_weights`` on
        a module without parameters of its own (an MLP of Linears), so a hook there would not run. The own
        init must use ``transformers.initialization``, which leaves weights loaded from a checkpoint alone."""
        for module in self.modules():
            own = getattr(module, "init_own_weights", None)
            if callable(own):
                own()


class MMARModel(MMARPreTrainedModel):
    def __init__(self, config: MMARConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModelForCausalLM.from_config(config.backbone_config)
        hidden = config.backbone_config.hidden_size
        self.projections = nn.ModuleDict()
        self.pos_embeds = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for m, spec in config.modalities.items():
            if spec.kind == "discrete":  # codes: a codebook embedding in, a codebook head out
                self.projections[m] = nn.Embedding(spec.vocab_size, hidden)
                self.heads[m] = build_head(spec.head, cond_dim=hidden, vocab_size=spec.vocab_size)
            else:  # continuous tokens: an MLP in, e.g. a diffusion head out (none for understanding-only)
                dim = spec.token_dim
                self.projections[m] = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
                if spec.can_generate:
                    self.heads[m] = build_head(spec.head, cond_dim=hidden, token_dim=dim)
            if config.pos_embed:  # one learned vector per cell of the largest grid (per index: one size)
                self.pos_embeds[m] = nn.Embedding(position_table_size(spec), hidden)
        self.placeholder = config.placeholder_ids()
        self.post_init()
        self.init_own_weights_everywhere()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` restricted to safetensors: pickled weights are never loaded."""
        if kwargs.get("use_safetensors") is False or kwargs.get("trust_remote_code"):
            raise ValueError("mmar loads weights from safetensors only, without remote code")
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
            pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            raise FileNotFoundError(f"{path}: no .safetensors weights" + (
                f" (found {', '.join(pickles)}: mmar never unpickles weights; convert them to safetensors)"
                if pickles else ""))
        return super().from_pretrained(path, *args, use_safetensors=True, **kwargs)

    # -- pieces --------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.backbone.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def embed_values(self, modality: str, values: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Embed tokens of one modality, continuous ``[n, token_dim]`` or discrete ``[n]``; ``index`` =
        position of each within its item (defaults to consecutive complete items of the default size),
        ``row * width + col`` for modalities of several sizes (see :func:`mmar.sequence.grid_positions`)."""
        if values.is_floating_point():
            if not torch.isfinite(values).all():
                raise ValueError(f"{modality} tokens contain NaN or inf")
            values = values.to(self.get_input_embeddings().weight.dtype)
        x = self.projections[modality](values)
        if modality in self.pos_embeds:
            n_per = self.config.modalities[modality].num_tokens
            if index is None:
                index = torch.arange(values.shape[0], device=values.device) % n_per
            x = x + self.pos_embeds[modality](index)
        return x

    def embed(self, input_ids: torch.Tensor, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        for m, ph in self.placeholder.items():
            mask = input_ids == ph
            n = int(mask.sum())
            v = (values or {}).get(m)
            have = 0 if v is None else v.shape[0]
            if n != have:
                raise ValueError(f"{n} {m} placeholder tokens in input_ids but {have} {m} tokens given")
            if n:
                index = self.item_positions(m, input_ids)
                embeds = embeds.masked_scatter(mask[..., None], self.embed_values(m, v, index).to(embeds.dtype))
        return embeds

    def item_positions(self, modality: str, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Cell index of each ``modality`` placeholder in ``input_ids``, read off the size markers; ``None``
        for a modality of one size (its tokens are numbered within each item)."""
        spec = self.config.modalities[modality]
        if modality not in self.pos_embeds or not spec.size_token_ids:
            return None
        return grid_positions(input_ids, spec.token_ids["start"], spec.token_ids["token"],
                              spec.size_token_ids, [tuple(g) for g in spec.grids], grid_width(spec))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, values=None, labels=None,
                inputs_embeds=None, cache=None, use_cache=False, past_key_values=None, **kwargs) -> MMAROutput:
        """``cache``: a transformers ``Cache`` (``past_key_values`` is accepted as its older name)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, values)
        cache = cache if cache is not None else past_key_values
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **{CACHE: cache}, **kwargs)
        hidden, cache = out.last_hidden_state, getattr(out, CACHE)
        if labels is None:
            return MMAROutput(hidden_states=hidden, cache=cache)
        return self.compute_loss(hidden, input_ids, labels, values, cache)

    def connected_zero(self, hidden: torch.Tensor) -> torch.Tensor:
        """0.0 that depends on the hidden states and on every trainable parameter of the heads, projections
        and position embeddings: each process's backward reaches all parameters whatever modalities its batch
        holds, so DDP and DeepSpeed ZeRO reduce the same gradients on every process (a mismatch aborts)."""
        extra = [p.sum() for part in (self.heads, self.projections, self.pos_embeds)
                 for p in part.parameters() if p.requires_grad]
        return (hidden.sum() + sum(extra, hidden.new_zeros(()))) * 0.0 + 0.0  # "+ 0.0" turns -0.0 into 0.0

    def compute_loss(self, hidden, input_ids, labels, values, cache=None) -> MMAROutput:
        h, nxt = hidden[:, :-1], labels[:, 1:]
        placeholders = torch.tensor(list(self.placeholder.values()), device=labels.device)
        text = (nxt != IGNORE) & ~torch.isin(nxt, placeholders)
        zero = self.connected_zero(hidden)
        text_loss = F.cross_entropy(self.lm_head(h[text]).float(), nxt[text]) if text.any() else zero
        losses = {}
        for m, ph in self.placeholder.items():
            target = nxt == ph
            if not target.any():
                losses[m] = zero
                continue
            if m not in self.heads:
                raise ValueError(f"{m} tokens are targets here, but this model's {m} tokenizer is for "
                                 "understanding only (no head can produce them)")
            trained = (labels == ph)[input_ids == ph]  # which of this modality's tokens are targets
            goal = values[m][trained]
            losses[m] = self.heads[m].loss(h[target], goal.to(h.dtype) if goal.is_floating_point() else goal)
        loss = text_loss + self.config.diffusion_loss_weight * sum(losses.values(), zero)
        return MMAROutput(loss=loss, text_loss=text_loss.detach(),
                          modality_losses={m: v.detach() for m, v in losses.items()},
                          cache=cache)


AutoModel.register(MMARConfig, MMARModel)


def grid_width(spec: ModalitySpec) -> int:
    """Columns of the widest grid of a modality of several sizes (the row length of its position table)."""
    return max(c for _, c in spec.grids)


def position_table_size(spec: ModalitySpec) -> int:
    """Cells of the position table: rows x columns of the bounding grid, or the tokens of the one size."""
    if spec.grids:
        return max(r for r, _ in spec.grids) * grid_width(spec)
    return spec.num_tokens


def _shared(head: dict) -> dict:
    """Head options that mean the same for a codebook head (its MLP width)."""
    return {k: v for k, v in head.items() if k in ("width",)}


def _complete(spec: dict | ModalitySpec, token_ids: dict[str, int], text_tokenizer, modality: str) -> ModalitySpec:
    """A modality's spec completed from its tokenizer: the tokenizer's config, the ids, the sizes (and for
    items of several sizes their grids and size markers) and, for discrete codes, a codebook head unless
    another head is named."""
    spec = spec.to_dict() if isinstance(spec, ModalitySpec) else dict(spec)
    tok = spec["tokenizer"] if isinstance(spec["tokenizer"], ModalityTokenizer) else build_tokenizer(spec["tokenizer"])
    out = ModalitySpec.from_dict({**spec, "tokenizer": {"name": tok.name, **tok.config()}})
    out.num_tokens, out.token_ids = tok.num_tokens(), token_ids
    if marked_sizes(tok):  # several sizes: each has a marker token and a grid of its own
        out.sizes, out.grids = [list(sz) for sz in tok.sizes], [list(tok.grid_of(sz)) for sz in tok.sizes]
        out.size_token_ids = size_token_ids(text_tokenizer, modality, tok.sizes)
    if tok.kind == "discrete":
        out.vocab_size = tok.vocab_size
        if out.head.get("name") in (None, "diffusion"):
            out.head = {"name": "codebook", **_shared(out.head)}
    else:
        out.token_dim, out.can_generate = tok.token_dim, tok.can_decode
    return out


def build_model(backbone: dict | str, tokenizer, modalities: dict, **config_kwargs) -> MMARModel:
    """Build an MMARModel whose special-token ids come from ``tokenizer``.

    ``backbone`` is either a config dict with ``model_type`` (train from scratch) or the path of a
    local ``AutoModelForCausalLM`` checkpoint (its embeddings are resized for the new tokens).
    ``modalities[m]["tokenizer"]`` is a spec dict or an already built (e.g. trained) tokenizer.
    Discrete tokenizers get a codebook embedding and, unless another head is named, a codebook head.
    """
    ids = modality_token_ids(tokenizer, modalities)
    specs = {m: _complete(spec, ids[m], tokenizer, m) for m, spec in modalities.items()}
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if isinstance(backbone, dict):
        backbone = dict(backbone)
        model_type = backbone.pop("model_type", "llama")
        bb_config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **backbone)
        config = MMARConfig(backbone_config=bb_config, modalities=specs, **config_kwargs)
        return MMARModel(config)
    bb = AutoModelForCausalLM.from_pretrained(backbone, use_safetensors=True)
    if bb.get_input_embeddings().weight.shape[0] < len(tokenizer):
        bb.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for key, value in special.items():  # the tokenizer is the truth where the checkpoint says nothing
        if getattr(bb.config, key, None) is None:
            setattr(bb.config, key, value if value is not None else special["eos_token_id"])
    config = MMARConfig(backbone_config=bb.config, modalities=specs, **config_kwargs)
    return MMARModel(config, backbone=bb)
