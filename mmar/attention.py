"""``attn_implementation="xformers"``: xformers' memory-efficient attention inside any transformers model.

Registered with transformers' ``AttentionInterface`` (the kernel) and
``AttentionMaskInterface`` (its mask: the same boolean mask SDPA gets, or none
where SDPA would rely on ``is_causal``). The kernel turns that mask into an
xformers bias: no mask -> ``LowerTriangularMask``; packed rows (position ids
that restart, no cache) -> ``BlockDiagonalCausalMask`` over the flattened batch;
anything else (padding, a KV cache) -> an additive tensor bias. Grouped-query
heads are expanded. Without xformers' CUDA kernels (no GPU, or a wheel built for
another torch) it falls back to SDPA with one clear warning.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "xformers"
_ALIGN = 8  # xformers wants the key length of a tensor bias padded to a multiple of 8
_state = {"warned": False, "ok": None}


def xformers_available() -> bool:
    """True when xformers imports and its memory-efficient CUDA kernels loaded."""
    if _state["ok"] is None:
        _state["ok"] = False
        if torch.cuda.is_available():  # xformers has no CPU kernels: don't even import it there
            try:
                from xformers.ops.fmha import cutlass

                _state["ok"] = bool(cutlass.FwOp.is_available())
            except Exception:  # noqa: BLE001 - any import failure means: not usable
                pass
    return _state["ok"]


def _fallback_warning(reason: str) -> None:
    if not _state["warned"]:
        warnings.warn(f"attn_implementation='xformers': {reason}; using PyTorch SDPA instead "
                      "(same results, this warning is shown once).", stacklevel=3)
        _state["warned"] = True


def packed_lengths(position_ids: torch.Tensor | None, mask: torch.Tensor | None = None) -> list[int] | None:
    """Lengths of the sequences packed in each row (a new sequence wherever the position id does not
    go up by one, as transformers reads packed rows), flattened over the batch; ``None`` if no row is
    packed, or if ``mask`` (the boolean SDPA mask) is not exactly that block-diagonal causal mask
    (e.g. left padding, whose clamped position ids also repeat)."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if int(starts.sum()) == position_ids.shape[0]:
        return None
    if mask is not None:
        seq = starts.cumsum(-1)
        n = seq.shape[-1]
        expected = (seq[:, :, None] == seq[:, None, :]) & torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        if mask.shape[-2:] != (n, n) or not torch.equal(mask[:, 0], expected):
            return None
    lengths = []
    for row in starts:
        idx = torch.nonzero(row).flatten().tolist() + [row.shape[0]]
        lengths += [b - a for a, b in zip(idx[:-1], idx[1:])]
    return lengths


def xformers_bias(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int, heads: int,
                  dtype: torch.dtype, device: torch.device, position_ids: torch.Tensor | None = None):
    """The xformers attention bias for what transformers' SDPA mask says (see module docstring).

    Returns ``(bias, flatten)``; ``flatten`` is True when the batch must be viewed as one row (packed)."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, LowerTriangularMask

    lengths = packed_lengths(position_ids, attention_mask) if q_len == kv_len else None
    if lengths is not None:
        return BlockDiagonalCausalMask.from_seqlens(lengths), True
    if attention_mask is None:
        return (LowerTriangularMask() if q_len > 1 else None), False
    # a query that may see nothing (a padding position) would give NaN, which then leaks through the
    # values of later layers: let it see everything instead (its output is never used), as SDPA's fix does
    allowed = attention_mask | ~attention_mask.any(-1, keepdim=True)
    padded = -(-kv_len // _ALIGN) * _ALIGN
    bias = torch.full((batch, heads, q_len, padded), float("-inf"), dtype=dtype, device=device)
    bias[..., :kv_len].masked_fill_(allowed.expand(batch, heads, q_len, kv_len), 0.0)
    return bias[..., :kv_len], False


def xformers_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """``query`` ``[B, H, Lq, D]``, ``key`` / ``value`` ``[B, Hkv, Lk, D]`` -> ``([B, Lq, H, D], None)``."""
    if not xformers_available():
        _fallback_warning("xformers' CUDA kernels are not available here" if query.is_cuda else
                          f"xformers has no kernels for {query.device.type} tensors")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    import xformers.ops as xops

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    b, h, lq, d = query.shape
    bias, flatten = xformers_bias(attention_mask, lq, key.shape[2], b, h, query.dtype, query.device,
                                  kwargs.get("position_ids"))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D]
    if flatten:
        q, k, v = (t.reshape(1, -1, h, d) for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0,
                                          scale=scaling)
    return out.reshape(b, lq, h, d), None


AttentionInterface.register(NAME, xformers_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
