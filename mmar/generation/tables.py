"""What the sampler needs to know about a model's tokens, read once per call.

Modalities are numbered in the config's order; an item is open in a row when its ``item`` index is
``>= 0``. The lookup tensors (``start_mod``, ``ph``, ``end``, ``n_tokens``) let the sampler turn a batch
of sampled ids into row state with tensor ops instead of a Python loop over rows.

Modalities of several sizes (``spec.sizes``) open every item with a size marker after the start
token (:mod:`mmar.sequence`): ``marker_mod`` / ``marker_need`` / ``marker_cols`` say, per vocabulary id,
whose marker it is, how many tokens its item has and how many columns its grid, so the sampler reads
the size the LM head chose (or was told) and numbers each latent by its cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenTables:
    names: list[str]  # modality of each index
    start_of: dict[int, str]  # start token id -> modality, for modalities the model can generate
    start_ids: torch.Tensor  # [n] those start ids
    start_mod: torch.Tensor  # [vocab] modality index of a start token, -1 for every other token
    ph: torch.Tensor  # [n_mod] placeholder id of each modality
    end: torch.Tensor  # [n_mod] end id of each modality
    n_tokens: torch.Tensor  # [n_mod] tokens per item
    eos: int | None
    pad: int
    bos: int | None
    ban_mask: torch.Tensor  # [vocab] never sampled as text
    marked: torch.Tensor  # [n_mod] True where items carry a size marker
    width: torch.Tensor  # [n_mod] row length of the position table (marked modalities), else 0
    marker_mod: torch.Tensor  # [vocab] modality index of a size marker, -1 for every other token
    marker_need: torch.Tensor  # [vocab] tokens of the item a marker opens
    marker_cols: torch.Tensor  # [vocab] grid columns of that item
    marker_of: dict[str, dict[tuple[int, int], int]]  # modality -> (height, width) -> marker id
    size_of: dict[int, tuple[int, int]]  # marker id -> (height, width)
    item_token: torch.Tensor  # [vocab] True for every item's own tokens: start, placeholder, end, size marker

    @property
    def longest_item(self) -> int:
        """The most steps an item takes before its end token (its marker included)."""
        if not len(self.names):
            return 0
        return max(int(self.n_tokens.max()), int(self.marker_need.max())) + bool(self.marked.any())


def token_tables(model, mode: str, eos_token_id: int | None, suppress_ids: list[int] | None) -> TokenTables:
    """The tables of ``model``; ``eos_token_id`` defaults to the backbone's, ``suppress_ids`` are banned."""
    mods = model.config.modalities  # {name: ModalitySpec}
    if mode in mods and not mods[mode].can_generate:
        raise ValueError(f"this model's {mode} tokenizer is for understanding only; it cannot generate {mode}")
    device = model.lm_head.weight.device
    names = list(mods)
    start_of = {s.token_ids["start"]: m for m, s in mods.items() if s.can_generate}
    understanding_only = [s.token_ids["start"] for s in mods.values() if not s.can_generate]
    bb = model.config.backbone_config
    eos = eos_token_id if eos_token_id is not None else bb.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad, bos = bb.pad_token_id, bb.bos_token_id
    pad = eos if pad is None else pad
    banned = [s.token_ids[k] for s in mods.values() for k in ("token", "end")] + understanding_only
    banned += [t for s in mods.values() for t in s.size_token_ids or []]  # markers only right after a start
    banned += [t for t in [bos, pad, *(suppress_ids or [])] if t is not None and t != eos and t not in start_of]
    vocab = model.lm_head.out_features
    ban_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ban_mask[[t for t in banned if 0 <= t < vocab]] = True
    start_mod = torch.full((vocab,), -1, dtype=torch.long, device=device)
    for tid, m in start_of.items():
        if 0 <= tid < vocab:
            start_mod[tid] = names.index(m)

    def per_mod(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    markers = _marker_tables(mods, names, vocab, device)
    item_token = torch.zeros(vocab, dtype=torch.bool, device=device)
    item_ids = [s.token_ids[k] for s in mods.values() for k in ("start", "token", "end")]
    item_ids += [t for s in mods.values() for t in s.size_token_ids or []]
    item_token[[t for t in item_ids if 0 <= t < vocab]] = True

    return TokenTables(
        names=names, start_of=start_of, start_ids=per_mod(list(start_of)), start_mod=start_mod,
        ph=per_mod([mods[m].token_ids["token"] for m in names]),
        end=per_mod([mods[m].token_ids["end"] for m in names]),
        n_tokens=per_mod([mods[m].num_tokens for m in names]),
        eos=eos, pad=pad, bos=bos, ban_mask=ban_mask, item_token=item_token, **markers)


def _marker_tables(mods, names: list[str], vocab: int, device) -> dict:
    """The size-marker lookups of :class:`TokenTables` (empty for models of one size per modality)."""
    marker_mod = torch.full((vocab,), -1, dtype=torch.long, device=device)
    marker_need = torch.zeros(vocab, dtype=torch.long, device=device)
    marker_cols = torch.zeros(vocab, dtype=torch.long, device=device)
    marked, width, marker_of, size_of = [], [], {}, {}
    for mi, m in enumerate(names):
        spec = mods[m]
        ids = spec.size_token_ids or []
        marked.append(bool(ids))
        width.append(max((c for _, c in spec.grids), default=0) if ids else 0)
        marker_of[m] = {tuple(sz): tid for sz, tid in zip(spec.sizes or [], ids)}
        for sz, (rows, cols), tid in zip(spec.sizes or [], spec.grids or [], ids):
            marker_mod[tid], marker_need[tid], marker_cols[tid] = mi, rows * cols, cols
            size_of[tid] = tuple(sz)
    return dict(marked=torch.tensor(marked, dtype=torch.bool, device=device),
                width=torch.tensor(width, dtype=torch.long, device=device), marker_mod=marker_mod,
                marker_need=marker_need, marker_cols=marker_cols, marker_of=marker_of, size_of=size_of)
