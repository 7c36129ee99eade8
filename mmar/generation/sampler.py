"""One sampler for interleaved output, as a loop of named steps.

Text tokens come from the LM head. When it samples ``<|image_start|>`` the row switches to image mode:
the modality's head draws exactly N latents, each fed back through the input projection, then
``<|image_end|>`` is forced and the row returns to text, until EOS or the limits. Rows are independent
(left padding, one KV cache for the batch), so a batch equals each sample alone when each row has its own
``torch.Generator``.

Classifier-free guidance runs an unconditional copy of every row in the same backbone call (rows
``B..2B``). Its attention mask hides the prompt: when its row opens an item, the copy sees only
``BOS <|image_start|>`` and the item's own tokens — exactly what condition dropout trained on. Dual
guidance (``image_guidance_scale``, for editing) adds a third branch that sees the prompt's items (the
input image) but not its text: rows ``B..2B`` see the items, ``2B..3B`` nothing (:mod:`.branches`).

Each step (:meth:`Sampler.run`): ``snapshot`` (the one host sync of the step), ``forward`` (the backbone),
``step_sizes`` (rows that just opened an item of a modality with several sizes get its size marker: the
one asked for, or the LM head's choice among the markers), ``step_items`` (heads draw the next latent of
rows inside an item), ``close_items`` (rows whose item is complete get its end token), ``step_text`` (the
LM head and the logits processors pick the text rows' tokens), ``advance`` (write the new column into the
preallocated mask, positions and embeddings). Row state (open item, its size, tokens into it, counters,
done) lives in tensors on the model's device, so rows of one batch can draw items of different sizes.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache

from ..compat import CACHE
from ..types import segment_modalities
from .branches import branch_masks, branch_names
from .config import GenerationDefaults
from .logits import TextRows, build_processors, choose
from .output import GenerationOutput, RowOutput, assemble
from .tables import token_tables

MODES = ("auto", "text")  # and the name of any modality: open an item of it at once


def _modes(model) -> tuple[str, ...]:
    """The modes ``model`` takes: auto, text, each of its modalities, and any other modality mmar knows
    (as before, a mode the model has no tokenizer for generates as ``auto`` does)."""
    return tuple(dict.fromkeys([*MODES, *model.config.modalities, *segment_modalities()]))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled decoder
COMPILE_OPTIONS: dict = {"dynamic": False}  # torch.compile's arguments (tests use backend="eager")


def compiled_decoder(model):
    """``torch.compile`` of the backbone's decoder, made once per model (the static cache keeps every
    decode step's shapes fixed, so later calls of the same batch and limit reuse the graph)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model.decoder, **COMPILE_OPTIONS)
    return _COMPILED[model]


def _row_generators(generator, batch: int):
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return list(generator)
    return generator


@dataclass
class _Step:
    """What one step writes for the ``B`` conditional rows."""

    ids: torch.Tensor  # [B] the new token of each row (pad for finished rows)
    embed: torch.Tensor  # [B, hidden] its input embedding
    cond: torch.Tensor  # [B] 1 where the conditional row attends to the new column
    uncond: torch.Tensor  # [B] likewise for the unconditional copy (item tokens and starts only)


@dataclass
class _Snapshot:
    """Host copy of the row state at the start of a step."""

    item: list[int]
    k: list[int]
    need: list[int]
    done: list[bool]
    last: list[int]
    sizing: list[bool]


class Sampler:
    """Holds one call's state; :meth:`run` samples. See :func:`generate` for the arguments."""

    def __init__(self, model, input_ids, attention_mask, values, settings: GenerationDefaults, *, mode,
                 decode_text, generator, suppress_ids, eos_token_id, progress, callback, sizes=None):
        if mode not in _modes(model):
            raise ValueError(f"mode must be one of {_modes(model)}, got {mode!r}")
        if attention_mask[:, -1].eq(0).any():
            raise ValueError("generation needs left padding (the last column of every row must be real)")
        settings.check_mode(mode)
        self.model, self.s, self.mode = model, settings, mode
        self.t = token_tables(model, mode, eos_token_id, suppress_ids)
        self.B, self.device = input_ids.shape[0], input_ids.device
        self.gens = _row_generators(generator, self.B)
        self.embed_tokens = model.get_input_embeddings()
        guided = (settings.guidance_scale != 1.0 or settings.image_guidance_scale is not None) and \
            mode != "text" and bool(self.t.names) and (settings.image_guidance_scale is not None or any(
                model.heads[m].needs_guidance_branch for m in self.t.names))  # heads with guidance distilled in
        self.branches = branch_names(guided, settings.image_guidance_scale)  # full [, items], none
        self.n_branch, self.cfg = len(self.branches), guided
        self._check_dual_heads()
        self.processors = build_processors(settings, ban_mask=self.t.ban_mask, start_ids=self.t.start_ids,
                                           eos=self.t.eos, text_only=mode == "text")
        self.limit = settings.max_new_tokens + settings.max_items * (self.t.longest_item + 2) + 1
        opened = self._open_rows(input_ids)
        self.forced = self._forced_markers(sizes)
        sized = [self.t.size_of.get(last) for last in input_ids[:, -1].tolist()]
        self.rows = [RowOutput(b, self.t.names[i] if i >= 0 else None, self.t, decode_text or (lambda ids: ids),
                               callback, size=sized[b]) for b, i in enumerate(opened)]
        self._prepare_sequence(input_ids, attention_mask, values, opened)
        self.step_latents: dict[int, torch.Tensor] = {}  # this step's item tokens by row (device tensors)
        self.bar = tqdm(total=self.limit, desc="generating", disable=not progress, leave=False)

    # -- prepare -------------------------------------------------------------------------------
    def _open_rows(self, input_ids) -> list[int]:
        """Row state tensors; a prompt ending in a start token (or a start token and a size marker) opens
        that item. Returns each row's item."""
        opened = []
        for last in input_ids[:, -1].tolist():
            if last in self.t.size_of:  # start + marker: the item and its size are set
                opened.append(int(self.t.marker_mod[last]))
                if self.mode not in ("auto", self.t.names[opened[-1]]):
                    raise ValueError(f"mode {self.mode!r} but the prompt opens a {self.t.names[opened[-1]]} item")
            elif last in self.t.start_of:
                if self.mode not in ("auto", self.t.start_of[last]):
                    raise ValueError(f"mode {self.mode!r} but the prompt opens a {self.t.start_of[last]} item")
                opened.append(self.t.names.index(self.t.start_of[last]))
            elif self.mode in self.t.names:
                raise ValueError(f"mode {self.mode!r}: the prompt must end with the {self.mode} start token "
                                 f"(encode it with start_modality={self.mode!r})")
            else:
                opened.append(-1)

        def longs(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        self.item = longs(opened)  # modality index of the open item, -1 in text
        self.k = torch.zeros_like(self.item)  # tokens of that item so far
        self.need = torch.where(self.item >= 0, self.t.n_tokens[self.item.clamp(min=0)], 0)  # its length
        last = input_ids[:, -1]
        has_marker = self.t.marker_mod[last] >= 0
        self.need = torch.where(has_marker, self.t.marker_need[last], self.need)
        self.cols = torch.where(has_marker, self.t.marker_cols[last], 0)  # grid columns of a sized item
        # opened without its size yet: the next step draws (or forces) the marker
        self.sizing = (self.item >= 0) & ~has_marker & self.t.marked[self.item.clamp(min=0)]
        self.opened_sized = has_marker  # the prompt's last two tokens are the start and the marker
        self.done = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        self.n_text = torch.zeros_like(self.item)
        self.n_items = (self.item >= 0).long()
        self.last = torch.full_like(self.item, self.t.pad)  # the previous step's tokens
        return opened

    def _prepare_sequence(self, input_ids, attention_mask, values, opened) -> None:
        """Mask, positions (and, without a cache, embeddings) preallocated for the whole limit."""
        B, P = input_ids.shape
        mask, embeds = attention_mask.long(), self.model.embed(input_ids, values)
        if self.cfg:  # the guidance copies see BOS (the items branch: the prompt's items) and an open item
            masks = branch_masks(input_ids, mask, self.t, self.branches, self.item >= 0, self.opened_sized)
            self.reset = masks.reset  # what each guidance row sees of the prompt once its row opens an item
            mask, embeds = masks.prompt, embeds.repeat(self.n_branch, 1, 1)
        R, width = mask.shape[0], P + self.limit
        self.mask = torch.zeros(R, width, dtype=torch.long, device=self.device)
        self.mask[:, :P] = mask
        self.pos = torch.zeros_like(self.mask)
        self.pos[:, :P] = (mask.cumsum(-1) - 1).clamp(min=0)
        self.count = mask.sum(-1)  # real columns per row: the next position is count - 1 after appending
        self.length, self.prompt_length = P, P
        self.step_embeds, self.cache = embeds, None
        if not self.s.use_cache:
            self.embeds = embeds.new_zeros(R, width, embeds.shape[-1])
            self.embeds[:, :P] = embeds
        self.pad_embed = self.embed_tokens(torch.tensor([self.t.pad], device=self.device))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> GenerationOutput:
        ran: list[bool] | None = None  # rows that took part in the previous step
        while True:
            snap = self.snapshot()
            if ran is not None:
                self.deliver(snap.last, ran)
            if all(snap.done):
                break
            if self.length - self.prompt_length >= self.limit:  # the limit: every token is handed over
                break
            ran = [not d for d in snap.done]
            h = self.forward()
            step = self._new_step()
            self.step_latents = {}
            self.step_sizes(h, snap, step)
            self.step_items(h, snap, step)
            self.close_items(snap, step)
            self.step_text(h, snap, step)
            self.advance(step)
            self.bar.update(1)
            if self._all_closing(snap, ran):
                self._close_now(ran)
        self.bar.close()
        for r in self.rows:
            r.finish()
        return assemble(self.rows)

    def _new_step(self) -> _Step:
        return _Step(ids=torch.full_like(self.item, self.t.pad), embed=self.pad_embed.expand(self.B, -1).clone(),
                     cond=torch.zeros_like(self.item), uncond=torch.zeros_like(self.item))

    def _all_closing(self, snap: _Snapshot, ran: list[bool]) -> bool:
        """Whether every row still running just drew the last token of its item (host state, no sync):
        its end token is then certain, and the backbone call on the last token would be wasted on it."""
        return self.length - self.prompt_length < self.limit and all(
            not r or (snap.item[b] >= 0 and not snap.sizing[b] and snap.k[b] + 1 == snap.need[b])
            for b, r in enumerate(ran))

    def _close_now(self, ran: list[bool]) -> None:
        """Append the end tokens in the same step: the next backbone call reads the last item token and
        the end token together (one call per item fewer; the same sequence, positions and masks)."""
        self.deliver(self.last.tolist(), ran)  # the item's last token and its latent
        self.step_latents = {}
        step = self._new_step()
        self.close_items(self.snapshot(), step)
        self.advance(step, append=True)

    def snapshot(self) -> _Snapshot:
        """The row state on the host: one device-to-host copy per step, not one per row."""
        item, k, need, done, last, sizing = torch.stack(
            [self.item, self.k, self.need, self.done.long(), self.last, self.sizing.long()]).tolist()
        return _Snapshot(item, k, need, [bool(d) for d in done], last, [bool(z) for z in sizing])

    def deliver(self, tokens: list[int], ran: list[bool]) -> None:
        """Hand the previous step's tokens (and item latents) of the rows that took part to their outputs."""
        for b, row in enumerate(self.rows):
            if ran[b]:
                row.add(tokens[b], self.step_latents.get(b))

    def forward(self) -> torch.Tensor:
        """The backbone on the new column (or, without a cache, on everything): last hidden states."""
        L = self.length
        if not self.s.use_cache:
            out = self.model(inputs_embeds=self.embeds[:, :L], attention_mask=self.mask[:, :L],
                             position_ids=self.pos[:, :L])
            return out.hidden_states[:, -1]
        if self.cache is None:
            return self._prefill()
        static = self.s.cache_implementation == "static"
        n = self.step_embeds.shape[1]  # new columns: 1, or 2 when an item's end token came with its last token
        kwargs = dict(inputs_embeds=self.step_embeds, attention_mask=self.mask if static else self.mask[:, :L],
                      position_ids=self.pos[:, L - n:L], use_cache=True, **{CACHE: self.cache})
        if self.s.compile:  # fixed shapes every step: one compiled graph for the whole call
            out = compiled_decoder(self.model)(**kwargs)
            return out.last_hidden_state[:, -1]
        return self.model(**kwargs).hidden_states[:, -1]

    def _prefill(self) -> torch.Tensor:
        """The prompt, ``prefill_chunk_size`` tokens per call so that the attention's memory grows linearly
        with the prompt's length instead of with its square."""
        P, static = self.prompt_length, self.s.cache_implementation == "static"
        chunk = self.s.prefill_chunk_size or P
        self.cache = StaticCache(config=self.model.config.backbone_config, max_cache_len=self.mask.shape[1]) \
            if static else DynamicCache(config=self.model.config.backbone_config)
        for i in range(0, P, chunk):
            j = min(P, i + chunk)
            out = self.model(inputs_embeds=self.step_embeds[:, i:j], attention_mask=self.mask if static else
                             self.mask[:, :j], position_ids=self.pos[:, i:j], use_cache=True,
                             **{CACHE: self.cache})
        return out.hidden_states[:, -1]

    def _branches(self, h):
        """The conditional rows' hidden states and the guidance branches' (``None``; a tensor; or the
        ``(items, none)`` pair of dual guidance), each ``[B, hidden]``."""
        if not self.cfg:
            return h, None
        hs = h.unflatten(0, (self.n_branch, self.B)).unbind(0)
        return hs[0], hs[1] if self.n_branch == 2 else hs[1:]

    def _check_dual_heads(self) -> None:
        """Dual guidance needs heads whose ``sample`` takes ``image_guidance_scale``."""
        if self.n_branch < 3:
            return
        for m in self.t.start_of.values():
            head = self.model.heads[m]
            if "image_guidance_scale" not in inspect.signature(head.sample).parameters:
                raise ValueError(f"image_guidance_scale: the {m} head ({type(head).__name__}) has no dual "
                                 "guidance; leave image_guidance_scale unset")

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # -- steps ---------------------------------------------------------------------------------
    def step_items(self, h, snap: _Snapshot, step: _Step) -> None:
        """Rows inside an item: its head draws the next token (one call per modality for all rows)."""
        hc, hu = self._branches(h)
        for mi, m in enumerate(self.t.names):
            rows = [b for b in range(self.B) if not snap.done[b] and snap.item[b] == mi and not snap.sizing[b]
                    and snap.k[b] < snap.need[b]]
            if not rows:
                continue
            idx = self._index(rows)
            k, cols = self.k[idx], self.cols[idx].clamp(min=1)
            # a sized item's tokens are numbered by cell, row * width + column (as in training)
            cell = torch.where(self.t.marked[mi], (k // cols) * self.t.width[mi] + k % cols, k)
            gens = [self.gens[b] for b in rows] if isinstance(self.gens, list) else self.gens
            uncond = None if hu is None else hu[idx] if self.n_branch == 2 else tuple(u[idx] for u in hu)
            dual = {"image_guidance_scale": self.s.image_guidance_scale} if self.n_branch == 3 else {}
            lat = self.model.heads[m].sample(hc[idx], uncond=uncond, guidance_scale=self.s.guidance_scale,
                                             temperature=self.s.image_temperature,
                                             num_inference_steps=self.s.num_inference_steps, generator=gens,
                                             **dual)
            step.embed[idx] = self.model.embed_values(m, lat, index=cell).to(step.embed.dtype)
            step.ids[idx], step.cond[idx], step.uncond[idx] = self.t.ph[mi], 1, 1
            self.k[idx] += 1
            self.step_latents.update(zip(rows, lat.unbind(0)))

    def _forced_markers(self, sizes) -> torch.Tensor:
        """``[B, n_mod]`` marker id each row must give its items (``-1``: the LM head chooses), from
        ``sizes``: ``{modality: (height, width)}`` for every row, or a list of those (or ``None``) per row."""
        forced = torch.full((self.B, len(self.t.names)), -1, dtype=torch.long, device=self.device)
        per_row = sizes if isinstance(sizes, (list, tuple)) else [sizes] * self.B
        if len(per_row) != self.B:
            raise ValueError(f"got {len(per_row)} size requests for a batch of {self.B}")
        for b, asked in enumerate(per_row):
            for m, size in (asked or {}).items():
                if m not in self.t.names:
                    raise ValueError(f"sizes: this model has no {m!r} modality")
                size = tuple(size)
                if self.t.marker_of[m]:  # a modality of one size has nothing to choose
                    if size not in self.t.marker_of[m]:
                        known = ", ".join(f"{h}x{w}" for h, w in self.t.marker_of[m])
                        raise ValueError(f"{m} size {size[0]}x{size[1]}: this model draws {known} (height x width)")
                    forced[b, self.t.names.index(m)] = self.t.marker_of[m][size]
        return forced

    def step_sizes(self, h, snap: _Snapshot, step: _Step) -> None:
        """Rows that just opened an item of several sizes: its size marker, the one asked for or the LM
        head's choice among the modality's markers (greedy at temperature 0, else drawn)."""
        rows = [b for b in range(self.B) if not snap.done[b] and snap.sizing[b]]
        if not rows:
            return
        idx = self._index(rows)
        forced = self.forced[idx, self.item[idx]]
        logits = self.model.lm_head(self._branches(h)[0][idx]).float()
        allowed = self.t.marker_mod[None, :] == self.item[idx, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        if self.s.temperature > 0:
            logits = logits / self.s.temperature
        chosen = choose(logits, self.s.temperature == 0, self.gens, rows)
        marker = torch.where(forced >= 0, forced, chosen)
        step.ids[idx], step.cond[idx], step.uncond[idx] = marker, 1, 1
        step.embed[idx] = self.embed_tokens(marker).to(step.embed.dtype)
        self.need[idx], self.cols[idx], self.k[idx] = self.t.marker_need[marker], self.t.marker_cols[marker], 0
        self.sizing[idx] = False

    def close_items(self, snap: _Snapshot, step: _Step) -> None:
        """Rows whose item is complete: its end token (seen by the conditional row only)."""
        rows = [b for b in range(self.B) if not snap.done[b] and snap.item[b] >= 0 and not snap.sizing[b]
                and snap.k[b] == snap.need[b]]
        if not rows:
            return
        idx = self._index(rows)
        ends = self.t.end[self.item[idx]]
        step.ids[idx], step.cond[idx] = ends, 1
        step.embed[idx] = self.embed_tokens(ends).to(step.embed.dtype)
        self.item[idx], self.k[idx] = -1, 0

    def step_text(self, h, snap: _Snapshot, step: _Step) -> None:
        """Rows in text: LM head, logits processors, one draw per row."""
        rows = [b for b in range(self.B) if not snap.done[b] and snap.item[b] < 0]
        if not rows:
            return
        idx, every = self._index(rows), len(rows) == self.B
        hc = self._branches(h)[0]
        logits = self.model.lm_head(hc if every else hc[idx]).float()
        logits = self.processors(logits, TextRows(n_text=self.n_text[idx], n_items=self.n_items[idx]))
        toks = choose(logits, self.s.temperature == 0, self.gens, rows)
        self._record_text(idx, toks, step)
        embeds = self.embed_tokens(toks).to(step.embed.dtype)
        if every:
            step.embed = embeds
        else:
            step.embed[idx] = embeds

    def _record_text(self, idx, toks, step: _Step) -> None:
        """Row state after text tokens: EOS ends a row, a start token opens an item."""
        eos = toks == self.t.eos if self.t.eos is not None else torch.zeros_like(toks, dtype=torch.bool)
        mod = self.t.start_mod[toks]
        start = mod >= 0
        step.ids[idx], step.cond[idx], step.uncond[idx] = toks, 1, start.long()
        self.done[idx] |= eos
        self.item[idx], self.k[idx] = mod, 0
        self.need[idx] = torch.where(start, self.t.n_tokens[mod.clamp(min=0)], self.need[idx])
        self.sizing[idx] = start & self.t.marked[mod.clamp(min=0)]  # its size marker comes next
        self.n_items[idx] += start.long()
        self.n_text[idx] += (~(eos | start)).long()
        if self.cfg:
            self._forget_prompt(idx, start)

    def _forget_prompt(self, idx, start) -> None:
        """The guidance copies of a row that opens an item forget everything but BOS (the items branch:
        BOS and the prompt's items)."""
        L, P, n = self.length, self.prompt_length, self.n_branch - 1
        u = torch.cat([idx + (j + 1) * self.B for j in range(n)])  # the copies' rows
        seen = torch.cat([self.reset[idx + j * self.B] for j in range(n)])
        start = start.repeat(n)
        reset = torch.zeros(len(u), L, dtype=self.mask.dtype, device=self.device)
        reset[:, :P] = seen
        self.mask[u, :L] = torch.where(start[:, None], reset, self.mask[u, :L])
        self.count[u] = torch.where(start, seen.sum(-1), self.count[u])

    def advance(self, step: _Step, append: bool = False) -> None:
        """Write the new column into the preallocated mask and positions (``append``: a second new column
        in the same step, fed with the first in one backbone call)."""
        L = self.length
        cols = torch.cat([step.cond, *[step.uncond] * (self.n_branch - 1)]) if self.cfg else step.cond
        embeds = step.embed.repeat(self.n_branch, 1) if self.cfg else step.embed
        self.mask[:, L] = cols
        self.count += cols
        self.pos[:, L] = (self.count - 1).clamp(min=0)
        if not self.s.use_cache:
            self.embeds[:, L] = embeds
        new = embeds[:, None]
        self.step_embeds = torch.cat([self.step_embeds, new], 1) if append else new
        self.length, self.last = L + 1, step.ids


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: dict | None = None, *,
             config: GenerationDefaults | None = None, decode_text=None, mode: str = "auto", generator=None,
             suppress_ids: list[int] | None = None, eos_token_id: int | None = None, progress: bool = False,
             callback=None, sizes=None, **settings) -> GenerationOutput:
    """Sample continuations of a left-padded batch (see :meth:`MMARProcessor.collate`).

    Sampling settings (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``guidance_scale``,
    ``image_temperature``, ``num_inference_steps``, ``max_items``, ``min_new_tokens``, ``use_cache``) come
    from ``config`` (a :class:`GenerationDefaults`, default: its defaults) updated with the keyword
    arguments given; bad values raise a ``ValueError`` naming them. ``temperature=0`` is greedy,
    ``guidance_scale`` > 1 turns classifier-free guidance on; ``image_guidance_scale`` (editing) turns
    dual guidance on: three branches, the prompt's items' scale next to ``guidance_scale`` for its text.

    ``mode``: ``"auto"`` lets the model choose; ``"text"`` forbids items; a modality's name (image,
    audio, ...) expects the prompt to end with that modality's start token (``start_modality`` in the processor).
    ``suppress_ids`` are never sampled (e.g. the tokenizer's other special tokens); ``eos_token_id``
    (default: the backbone's) ends a row, e.g. the processor's ``stop_id``. ``sizes``: for modalities of
    several sizes, ``{modality: (height, width)}`` that every row's items get, or one such dict (or
    ``None``: the model chooses) per row; the items of the output then carry their size as a third
    element, ``(modality, tokens, (height, width))``.
    """
    settings = (config or GenerationDefaults()).replace(**settings)
    sampler = Sampler(model, input_ids, attention_mask, values, settings, mode=mode, decode_text=decode_text,
                      generator=generator, suppress_ids=suppress_ids, eos_token_id=eos_token_id,
                      progress=progress, callback=callback, sizes=sizes)
    return sampler.run()
