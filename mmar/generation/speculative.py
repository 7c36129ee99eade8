"""Continuous speculative decoding (CSpD, Wang et al. 2024): a cheap draft proposes k tokens of an item,
the target scores them in one backbone call, and the acceptance rule of :mod:`.trajectory` keeps the
output distributed as the target's own (stochastic) sampling.

The draft shares the target's tokenizers: a separate, smaller :class:`MMARModel`, or :func:`layer_draft`
(the target's first ``L`` layers with its own final norm, projections and heads: no training, no extra
weights). One round for a row whose next token is column ``C``:

1. the draft feeds what it has not seen and draws ``k`` tokens one by one (its stochastic chain; each
   token's trajectory and step means are kept);
2. the target feeds the last committed token and the ``k`` drafts in one call: its hidden states
   condition the ``k`` drafts and one more token;
3. the drafts are accepted in order with ``min(1, p / q)`` along each trajectory (the target's density
   is evaluated on the draft's own trajectory: the paper's trajectory alignment, made exact); the first
   rejected one is redrawn from the residual, or after ``k`` acceptances the target draws one more;
4. both KV caches are cropped to the committed tokens (``DynamicCache.crop``).

The paper's *pre-filling*: ``prefill_tokens`` first tokens of every item come from the target alone.
Classifier-free guidance runs an unconditional branch in each model (the sampler's layout,
:mod:`.branches`); both densities are then the guided chains'. Rows are decoded one after another
(their acceptances differ). The call draws the item each prompt opens (``mode`` = its modality, as in
:func:`.sampler.generate`) and ends the row after it, in the plain sampler's output format.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..compat import CACHE
from ..heads.continuous import timestep_features
from ..heads.diffusion import DiffusionHead
from ..heads.guidance import guidance_rows, guide
from .branches import FULL, NONE, branch_masks
from .output import GenerationOutput, RowOutput, assemble
from .tables import token_tables
from .trajectory import accept_drafts, draw_noise, gaussian_chain, residual_sample, sample_trajectory


@dataclass
class SpeculativeStats:
    """Counts of one call (all rows)."""

    target_calls: int = 0  # target backbone calls after the prompt (one per round)
    draft_calls: int = 0  # draft backbone calls after the prompt
    proposed: int = 0  # tokens drafted
    accepted: int = 0  # drafts kept
    residual_tries: int = 0  # target proposals drawn for rejected drafts
    fallbacks: int = 0  # rejected drafts whose residual draw hit the try limit
    tokens: int = 0  # item tokens committed

    @property
    def tokens_per_call(self) -> float:
        """Item tokens per target backbone call (1 without speculation)."""
        return self.tokens / max(self.target_calls, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


class HeadDenoiser:
    """A diffusion head's network with fixed conditions ``cond`` ``[n, hidden]`` (and the unconditional
    branch's, for guidance), as the denoiser callable of :mod:`.trajectory`."""

    def __init__(self, head: DiffusionHead, chain, cond, uncond=None, guidance_scale: float = 1.0):
        rows, self.branches = guidance_rows(cond, uncond)
        self.net, self.scale = head.net, guidance_scale
        self.c = self.net.cond_embed(rows).unflatten(0, (self.branches, cond.shape[0]))
        self.t = self.net.time_embed(timestep_features(chain.timesteps.to(cond.device)).to(self.c.dtype))

    def __call__(self, x, step, rows):
        y = (self.t[step][None] + self.c[:, rows]).flatten(0, 1)
        out = self.net.denoise(x.to(y.dtype).repeat(self.branches, 1), self.net.modulations(y))
        return guide(out, self.branches, self.scale).to(x.dtype)


def head_chain(head, num_inference_steps: int | None = None, eta: float = 1.0):
    """The stochastic DDIM chain of a diffusion head's noise schedule (its own step count by default)."""
    if not isinstance(head, DiffusionHead):
        raise ValueError(f"speculative decoding needs diffusion heads, got {type(head).__name__}")
    sched = head.sampler("DDIMScheduler")
    sched.set_timesteps(num_inference_steps or head.num_inference_steps)
    return gaussian_chain(sched, eta)


def layer_draft(target, num_layers: int):
    """The target's first ``num_layers`` decoder layers, its final norm, projections and heads, as a model
    of its own that shares the target's parameters (no copy of any weight)."""
    layers = getattr(target.decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(target.decoder).__name__} keeps no `layers` list to take a draft from")
    if not 1 <= num_layers < len(layers):
        raise ValueError(f"a layer draft needs 1 <= num_layers < {len(layers)}, got {num_layers}")
    shared = {id(t): t for t in itertools.chain(target.parameters(), target.buffers())}
    draft = copy.deepcopy(target, shared)  # modules copied, tensors shared
    draft.decoder.layers = nn.ModuleList(list(draft.decoder.layers)[:num_layers])
    for cfg in {id(c): c for c in (draft.config.backbone_config, draft.backbone.config, draft.decoder.config)}.values():
        cfg.num_hidden_layers = num_layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:num_layers]
    return draft.eval()


def check_draft(target, draft) -> None:
    """The draft must read and write the target's tokens: same vocabulary, ids and token shapes."""
    if draft.lm_head.out_features != target.lm_head.out_features or draft.placeholder != target.placeholder:
        raise ValueError("the draft model must share the target's text tokenizer and modality token ids")
    for m, spec in target.config.modalities.items():
        other = draft.config.modalities.get(m)
        if other is None or (other.token_dim, other.num_tokens) != (spec.token_dim, spec.num_tokens):
            raise ValueError(f"the draft model's {m} tokens differ from the target's")


class _Stream:
    """One model's view of one row: its KV cache over ``length`` columns, the row's mask and positions
    (``[branches, width]``, every column of the item visible to every branch)."""

    def __init__(self, model, mask, pos):
        self.model, self.mask, self.pos = model, mask, pos
        self.cache = DynamicCache(config=model.config.backbone_config)
        self.length = 0

    def feed(self, embeds: torch.Tensor, upto: int) -> torch.Tensor:
        """Feed columns ``length .. upto`` of ``embeds`` ``[branches, width, hidden]``; their hidden states."""
        start, self.length = self.length, upto
        return self.model(inputs_embeds=embeds[:, start:upto], attention_mask=self.mask[:, :upto],
                          position_ids=self.pos[:, start:upto], use_cache=True, **{CACHE: self.cache}).hidden_states

    def crop(self, length: int) -> None:
        if self.length > length:  # a negative count removes that many columns in every transformers 5
            self.cache.crop(length - self.length)
            self.length = length


@dataclass
class SpeculativeSettings:
    """The call's knobs (see :func:`speculative_generate`)."""

    num_draft_tokens: int = 4
    prefill_tokens: int = 0
    guidance_scale: float = 1.0
    temperature: float = 1.0
    num_inference_steps: int | None = None
    eta: float = 1.0
    max_residual_tries: int = 100

    def __post_init__(self):
        for name in ("num_draft_tokens", "prefill_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"speculative decoding needs image_temperature > 0, got {self.temperature}")
        if not isinstance(self.max_residual_tries, int) or self.max_residual_tries < 1:
            raise ValueError(f"max_residual_tries must be an integer >= 1, got {self.max_residual_tries!r}")


class _Row:
    """One row's item, drawn round by round; ``C`` is the column of the next token."""

    def __init__(self, models, modality: str, ids, embeds, tables, s: SpeculativeSettings, generator, stats):
        (self.target, self.draft), self.m, self.s, self.gen, self.stats = models, modality, s, generator, stats
        self.heads = [model.heads[modality] for model in models]
        self.chain = head_chain(self.heads[0], s.num_inference_steps, s.eta).to(ids.device)
        spec = self.target.config.modalities[modality]
        self.n, self.dim, P = spec.num_tokens, spec.token_dim, ids.shape[0]
        mask = torch.ones(1, P, dtype=torch.long, device=ids.device)
        if s.guidance_scale != 1.0:  # the unconditional branch sees BOS and the open item only
            yes, no = torch.ones(1, dtype=torch.bool, device=ids.device), torch.zeros(1, dtype=torch.bool, device=ids.device)
            mask = branch_masks(ids[None], mask, tables, (FULL, NONE), yes, no).prompt
        R, width = mask.shape[0], P + self.n
        full = torch.ones(R, width, dtype=torch.long, device=ids.device)
        full[:, :P] = mask
        pos = torch.zeros_like(full)
        pos[:, :P] = (mask.cumsum(-1) - 1).clamp(min=0)
        pos[:, P:] = mask.sum(-1, keepdim=True) + torch.arange(self.n, device=ids.device)
        self.streams = [_Stream(model, full, pos) for model in models]
        self.embeds = [torch.cat([e[None].expand(R, -1, -1), e.new_zeros(R, self.n, e.shape[-1])], 1) for e in embeds]
        self.P = self.C = P
        self.tokens: list[torch.Tensor] = []
        self.conds: list[torch.Tensor] = []  # the target's condition of each committed token
        for stream, buf in zip(self.streams, self.embeds):
            if P > 1:  # the prompt but its last column, which the first round feeds
                stream.feed(buf, P - 1)

    @staticmethod
    def _split(h):
        return h[0], (h[1] if h.shape[0] == 2 else None)

    def _draw(self, denoise, rows):
        noise = draw_noise(len(self.chain), len(rows), self.dim, self.gen, rows.device)
        return sample_trajectory(denoise, self.chain, rows, noise, self.s.temperature)

    def _write(self, col: int, x: torch.Tensor) -> None:
        index = torch.tensor([col - self.P], device=x.device)
        for model, buf in zip((self.target, self.draft), self.embeds):
            buf[:, col] = model.embed_values(self.m, x, index=index).to(buf.dtype)

    def propose(self, k: int) -> list:
        """``k`` draft tokens: ``(states, means, denoiser)`` each, written into both models' columns."""
        drafts, zero = [], torch.zeros(1, dtype=torch.long, device=self.chain.a.device)
        for i in range(k):
            h = self.streams[1].feed(self.embeds[1], self.C + i)[:, -1:]
            den = HeadDenoiser(self.heads[1], self.chain, *self._split(h), guidance_scale=self.s.guidance_scale)
            states, means = self._draw(den, zero)
            self._write(self.C + i, states[-1])
            drafts.append((states, means, den))
        self.stats.draft_calls += k
        self.stats.proposed += k
        return drafts

    def verify(self, target: HeadDenoiser, drafts: list) -> int:
        """How many drafts, in order, are accepted."""
        if not drafts:
            return 0
        states, means = torch.cat([d[0] for d in drafts], 1), torch.cat([d[1] for d in drafts], 1)
        rows = torch.arange(len(drafts), device=states.device)
        ok = accept_drafts(target, self.chain, states, means, rows, self.gen, self.s.temperature)
        return int(ok.long().cumprod(0).sum())

    def resample(self, target: HeadDenoiser, j: int, draft: HeadDenoiser) -> torch.Tensor:
        """Rejected draft ``j``: a token from the residual of the target's and the draft's chains."""
        def target_j(x, step, rows):
            return target(x, step, torch.full_like(rows, j))

        rows = torch.zeros(1, dtype=torch.long, device=self.chain.a.device)
        res = residual_sample(target_j, draft, self.chain, rows, self.dim, self.gen, self.s.temperature,
                              max_tries=self.s.max_residual_tries)
        self.stats.residual_tries += int(res.tries.sum())
        self.stats.fallbacks += res.fallbacks
        return res.tokens

    def round(self) -> None:
        done = self.C - self.P
        k = 0 if done < self.s.prefill_tokens else min(self.s.num_draft_tokens, self.n - done - 1)
        drafts = self.propose(k)
        h = self.streams[0].feed(self.embeds[0], self.C + k)[:, -(k + 1):]
        target = HeadDenoiser(self.heads[0], self.chain, *self._split(h), guidance_scale=self.s.guidance_scale)
        j = self.verify(target, drafts)
        if j < k:
            new = self.resample(target, j, drafts[j][2])
        else:
            new = self._draw(target, torch.tensor([k], device=h.device))[0][-1]
        col = self.C + j
        self._write(col, new)
        self.tokens += [d[0][-1][0] for d in drafts[:j]] + [new[0]]
        self.conds += list(h[0, :j + 1].unbind(0))
        for stream in self.streams:
            stream.crop(col)  # the columns before the new token are the committed ones
        self.C = col + 1
        self.stats.accepted += j
        self.stats.tokens += j + 1
        self.stats.target_calls += 1

    def run(self) -> list[torch.Tensor]:
        while self.C - self.P < self.n:
            self.round()
        return self.tokens


def _draw_row(models, b: int, ids: torch.Tensor, embeds: list, tables, s: SpeculativeSettings, generator,
              stats: SpeculativeStats, decode_text) -> RowOutput:
    """Row ``b`` (its prompt ``ids`` without padding, each model's ``embeds`` of them): the item its start
    token opens, drawn by :class:`_Row`, then the item's end token and EOS, as the plain sampler writes it."""
    m = tables.start_of.get(int(ids[-1]))
    if m is None:
        raise ValueError("speculative decoding draws the item a prompt opens: end every prompt with a "
                         "start token (encode it with start_modality=...)")
    mi = tables.names.index(m)
    if bool(tables.marked[mi]):
        raise ValueError(f"speculative decoding does not draw {m} items of several sizes yet")
    row = _Row(models, m, ids, embeds, tables, s, generator, stats)
    out = RowOutput(b, m, tables, decode_text or (lambda t: t), None)
    for token in row.run():
        out.add(int(tables.ph[mi]), token)
    out.add(int(tables.end[mi]))
    if tables.eos is not None:
        out.add(tables.eos)
    out.finish()
    return out


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         values: dict | None = None, *, num_draft_tokens: int = 4, prefill_tokens: int = 0,
                         guidance_scale: float = 1.0, image_temperature: float = 1.0,
                         num_inference_steps: int | None = None, eta: float = 1.0, generator=None,
                         eos_token_id: int | None = None, max_residual_tries: int = 100,
                         decode_text=None) -> GenerationOutput:
    """Draw the item every prompt of a left-padded batch opens (its start token last, as with
    ``generate(..., mode=<modality>)``), ``draft`` proposing ``num_draft_tokens`` tokens per target call.

    The tokens follow the target's stochastic DDIM chain (``eta``; 1 = DDPM's ancestral steps) of
    ``num_inference_steps`` steps at ``image_temperature`` with ``guidance_scale``, up to its last
    stochastic step (see :mod:`.trajectory`). ``draft``: an :class:`MMARModel` with the target's tokens,
    e.g. :func:`layer_draft`. Returns the plain sampler's :class:`GenerationOutput` (each row: the item,
    then its end token and EOS) with ``stats``, a :class:`SpeculativeStats`. ``generator``: one
    ``torch.Generator`` for the whole call."""
    check_draft(target, draft)
    s = SpeculativeSettings(num_draft_tokens, prefill_tokens, guidance_scale, image_temperature,
                            num_inference_steps, eta, max_residual_tries)
    tables = token_tables(target, "auto", eos_token_id, None)
    embeds = [model.embed(input_ids, values) for model in (target, draft)]
    stats = SpeculativeStats()
    rows = [_draw_row((target, draft), b, input_ids[b, keep], [e[b, keep] for e in embeds], tables, s, generator,
                      stats, decode_text) for b, keep in enumerate(attention_mask.bool())]
    result = assemble(rows)
    result.stats = stats
    return result
