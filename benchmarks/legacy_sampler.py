"""A frozen copy of mmar's sampler before the generation package (mmar/generation.py at 5443460), kept
only so that ``benchmarks/sampler_overhead.py`` can report old / new ratios measured in one run on one
machine. Not part of the package; do not import it from mmar.

Original docstring: one sampler for interleaved output.

Text tokens come from the LM head. When it samples ``<|image_start|>`` the row
switches to image mode: the diffusion head draws exactly N latents, each fed
back through the input projection, then ``<|image_end|>`` is forced and the
row returns to text, until EOS or the limits. Rows are independent (left
padding, one KV cache for the batch), so a batch equals each sample alone when
each row has its own ``torch.Generator``.

Classifier-free guidance runs an unconditional copy of every row in the same
backbone call. Its attention mask hides the prompt: when its row opens an
item, the copy sees only ``BOS <|image_start|>`` and the item's own tokens —
exactly what condition dropout trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

MODES = ("auto", "text", "image", "audio")


@dataclass
class GenerationOutput:
    """``segments[b]``: row ``b``'s output in order, ``str`` or ``(modality, tokens [N, token_dim])``."""

    segments: list[list] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)


def _row_generators(generator, batch: int):
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return list(generator)
    return generator


class _Row:
    """Book-keeping of one row: which item it is in, what it has produced."""

    def __init__(self):
        self.item: str | None = None  # modality of the item being generated
        self.k = 0  # tokens of that item so far
        self.done = False
        self.n_text = self.n_items = 0
        self.text: list[int] = []
        self.latents: list[torch.Tensor] = []
        self.segments: list = []
        self.ids: list[int] = []

    def flush_text(self, decode):
        if self.text:
            self.segments.append(decode(self.text))
            self.text = []


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: dict | None = None, *,
             decode_text=None, mode: str = "auto", max_new_tokens: int = 64, min_new_tokens: int = 0,
             max_items: int = 4,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0,
             image_temperature: float = 1.0, num_inference_steps: int | None = None, generator=None,
             suppress_ids: list[int] | None = None, eos_token_id: int | None = None, use_cache: bool = True,
             progress: bool = False, callback=None) -> GenerationOutput:
    """Sample continuations of a left-padded batch (see :meth:`MMARProcessor.collate`).

    ``mode``: ``"auto"`` lets the model choose; ``"text"`` forbids items; ``"image"`` / ``"audio"``
    expect the prompt to end with that modality's start token (``start_modality`` in the processor).
    ``suppress_ids`` are never sampled (e.g. the tokenizer's other special tokens); ``eos_token_id``
    (default: the backbone's) ends a row, e.g. the processor's ``stop_id``; ``temperature=0`` is greedy. ``guidance_scale`` > 1 turns classifier-free guidance on.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if attention_mask[:, -1].eq(0).any():
        raise ValueError("generation needs left padding (the last column of every row must be real)")
    cfg = model.config
    mods = cfg.modalities
    start_of = {s["token_ids"]["start"]: m for m, s in mods.items() if s.get("can_generate", True)}
    understanding_only = [s["token_ids"]["start"] for s in mods.values() if not s.get("can_generate", True)]
    if mode in mods and not mods[mode].get("can_generate", True):
        raise ValueError(f"this model's {mode} tokenizer is for understanding only; it cannot generate {mode}")
    n_tokens = {m: s["num_tokens"] for m, s in mods.items()}
    bb = cfg.backbone_config
    eos, pad, bos = (eos_token_id if eos_token_id is not None else bb.eos_token_id), bb.pad_token_id, bb.bos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = eos if pad is None else pad
    banned = [s["token_ids"][k] for s in mods.values() for k in ("token", "end")] + understanding_only
    banned += [t for t in [bos, pad, *(suppress_ids or [])] if t is not None and t != eos and t not in start_of]
    decode_text = decode_text or (lambda ids: ids)
    B, device = input_ids.shape[0], input_ids.device
    embed_tokens = model.get_input_embeddings()
    vocab = model.lm_head.out_features
    ban_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ban_mask[[t for t in banned if 0 <= t < vocab]] = True
    start_ids = torch.tensor(list(start_of), dtype=torch.long, device=device)
    pad_embed = embed_tokens(torch.tensor([pad], device=device))
    gens = _row_generators(generator, B)
    use_cfg = guidance_scale != 1.0 and mode != "text" and bool(mods)
    rows = [_Row() for _ in range(B)]
    for b, row in enumerate(rows):
        last = int(input_ids[b, -1])
        if last in start_of:
            if mode not in ("auto", start_of[last]):
                raise ValueError(f"mode {mode!r} but the prompt opens a {start_of[last]} item")
            row.item, row.n_items = start_of[last], 1
        elif mode in mods:
            raise ValueError(f"mode {mode!r}: the prompt must end with the {mode} start token "
                             f"(encode it with start_modality={mode!r})")

    mask = attention_mask.clone()
    embeds = model.embed(input_ids, values)
    if use_cfg:
        # the unconditional copy sees BOS and an already-open item only
        first = mask.argmax(-1)
        umask = torch.zeros_like(mask)
        if bos is not None:
            umask[torch.arange(B), first] = (input_ids[torch.arange(B), first] == bos).long()
        bos_only = umask.clone()
        opened = torch.tensor([r.item is not None for r in rows], device=device)
        umask[:, -1] = torch.where(opened, 1, umask[:, -1])
        mask, embeds = torch.cat([mask, umask]), torch.cat([embeds, embeds])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    all_embeds, step_embeds, cache = embeds, embeds, None
    limit = max_new_tokens + max_items * (max(n_tokens.values(), default=0) + 2) + 1
    bar = tqdm(total=limit, desc="generating", disable=not progress, leave=False)
    ph_of = {m: s["token_ids"]["token"] for m, s in mods.items()}
    end_of = {m: s["token_ids"]["end"] for m, s in mods.items()}

    for _ in range(limit):
        if use_cache:
            out = model(inputs_embeds=step_embeds, attention_mask=mask, cache=cache,
                        position_ids=pos[:, -step_embeds.shape[1]:], use_cache=True)
            cache = out.cache
        else:
            out = model(inputs_embeds=all_embeds, attention_mask=mask, position_ids=pos)
        h = out.hidden_states[:, -1]
        hc, hu = (h[:B], h[B:]) if use_cfg else (h, None)
        next_embed = pad_embed.expand(B, -1).clone()
        new_ids = [pad] * B
        cond_col = torch.zeros(B, dtype=torch.long, device=device)
        uncond_col = torch.zeros(B, dtype=torch.long, device=device)
        latent_rows = {m: [b for b, r in enumerate(rows) if not r.done and r.item == m and r.k < n_tokens[m]]
                       for m in mods}
        closing = [b for b, r in enumerate(rows) if not r.done and r.item is not None and r.k == n_tokens[r.item]]
        text_rows = [b for b, r in enumerate(rows) if not r.done and r.item is None]

        for m, rs in latent_rows.items():
            if not rs:
                continue
            g = [gens[b] for b in rs] if isinstance(gens, list) else gens
            lat = model.heads[m].sample(hc[rs], uncond=hu[rs] if use_cfg else None, guidance_scale=guidance_scale,
                                        temperature=image_temperature, num_inference_steps=num_inference_steps,
                                        generator=g)
            index = torch.tensor([rows[b].k for b in rs], device=device)
            next_embed[rs] = model.embed_values(m, lat, index=index).to(next_embed.dtype)
            for i, b in enumerate(rs):
                rows[b].latents.append(lat[i])
                rows[b].k += 1
                new_ids[b] = ph_of[m]
                cond_col[b] = uncond_col[b] = 1

        for b in closing:
            r = rows[b]
            new_ids[b] = end_of[r.item]
            r.segments.append((r.item, torch.stack(r.latents)))
            if callback is not None:
                callback(b, r.segments[-1])
            r.item, r.k, r.latents = None, 0, []
            cond_col[b] = 1

        if text_rows:
            logits = model.lm_head(hc if len(text_rows) == B else hc[text_rows]).float()
            logits.masked_fill_(ban_mask, float("-inf"))
            for i, b in enumerate(text_rows):
                if start_of and (mode == "text" or rows[b].n_items >= max_items):
                    logits[i, start_ids] = float("-inf")
                if rows[b].n_text < min_new_tokens and eos is not None:
                    logits[i, eos] = float("-inf")
                if rows[b].n_text >= max_new_tokens and eos is not None:
                    logits[i] = float("-inf")
                    logits[i, eos] = 0.0
            toks = _sample_text(logits, temperature, top_k, top_p, gens, text_rows)
            for b, tok in zip(text_rows, toks):
                r = rows[b]
                new_ids[b] = tok
                cond_col[b] = 1
                if tok == eos:
                    r.flush_text(decode_text)
                    r.done = True
                    if callback is not None:
                        callback(b, None)
                elif tok in start_of:
                    r.flush_text(decode_text)
                    r.item, r.k = start_of[tok], 0
                    r.n_items += 1
                    uncond_col[b] = 1
                    if use_cfg:  # the unconditional copy forgets everything but BOS
                        mask[B + b] = 0
                        mask[B + b, : bos_only.shape[1]] = bos_only[b]
                else:
                    r.text.append(tok)
                    r.n_text += 1
                    if callback is not None:
                        callback(b, tok)
            text_embeds = embed_tokens(torch.tensor(toks, device=device)).to(next_embed.dtype)
            if len(text_rows) == B:
                next_embed = text_embeds
            else:
                next_embed[text_rows] = text_embeds
        for b in closing:
            next_embed[b] = embed_tokens(torch.tensor(new_ids[b], device=device))
        for b, r in enumerate(rows):
            if cond_col[b]:
                r.ids.append(new_ids[b])
        bar.update(1)
        if all(r.done for r in rows):
            break
        step = next_embed[:, None]
        cols = cond_col[:, None]
        if use_cfg:
            step, cols = torch.cat([step, step]), torch.cat([cols, uncond_col[:, None]])
        mask = torch.cat([mask, cols], dim=1)
        pos = torch.cat([pos, (mask.sum(-1, keepdim=True) - 1).clamp(min=0)], dim=1)
        step_embeds = step
        if not use_cache:
            all_embeds = torch.cat([all_embeds, step], dim=1)
    bar.close()
    for b, r in enumerate(rows):
        r.flush_text(decode_text)
        if r.item is not None and r.latents:  # limit reached inside an item: keep what is complete
            r.segments.append((r.item, torch.stack(r.latents)))
            if callback is not None:
                callback(b, r.segments[-1])
        if callback is not None and not r.done:
            callback(b, None)
    return GenerationOutput(segments=[r.segments for r in rows], token_ids=[r.ids for r in rows])


def _sample_text(logits, temperature, top_k, top_p, gens, rows) -> list[int]:
    if temperature == 0:
        return logits.argmax(-1).tolist()
    logits = logits / temperature
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    probs = logits.softmax(-1)
    if isinstance(gens, list):
        return [int(torch.multinomial(probs[i], 1, generator=gens[b])) for i, b in enumerate(rows)]
    return torch.multinomial(probs, 1, generator=gens).squeeze(-1).tolist()
