"""``attn_implementation="xformers"``: xformers' memory-efficient attention inside any transformers model.

Registered with transformers' ``AttentionInterface`` (the kernel) and
``AttentionMaskInterface`` (its mask: the same boolean mask SDPA gets, or none
where SDPA would rely on ``is_causal``). The kernel turns that mask into an
xformers bias: no mask -> ``LowerTriangularMask``; packed rows (position ids
that restart, no cache) -> ``BlockDiagonalCausalMask`` over the flattened batch;
anything else (padding, a KV cache) -> an additive tensor bias. Grouped-query
heads are expanded. Without a usable xformers kernel (no GPU, not installed, a broken
install) it falls back to SDPA with one warning that gives the real reason
(``xformers_status``); ``attention_report`` says which attention each part of a model runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import warnings

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "xformers"
_ALIGN = 8  # xformers wants the key length of a tensor bias padded to a multiple of 8
_state = {"warned": False, "ok": None, "why": ""}
KERNEL_DEVICES = {"cuda"}  # where xformers' memory-efficient kernels run


def _build_info() -> dict:
    """What the installed xformers wheel was built for (its ``cpp_lib.json``), without importing it."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(list(spec.submodule_search_locations)[0], "cpp_lib.json")
    try:
        with open(path) as f:
            return json.load(f).get("version", {})
    except (OSError, ValueError):
        return {}


def xformers_status() -> tuple[bool, str]:
    """``(usable, why)``: whether ``memory_efficient_attention`` can run here, and what runs it or why
    not (the real reason: not installed, no CUDA device, the extension built for another torch, ...).

    Computed once. On a machine without CUDA xformers is not even imported (it has no CPU kernels)."""
    if _state["ok"] is not None:
        return _state["ok"], _state["why"]
    ok, why = False, ""
    if importlib.util.find_spec("xformers") is None:
        why = "xformers is not installed (pip install 'mmar[xformers]')"
    elif not torch.cuda.is_available():
        why = "no CUDA device here, and xformers has no CPU kernels"
    else:
        try:
            from xformers import _cpp_lib
            from xformers.ops.fmha import cutlass, flash
        except (ImportError, OSError, RuntimeError) as e:  # a broken install: say what broke
            why = f"importing xformers failed: {type(e).__name__}: {e}"
        else:
            ext = extension_problem(_cpp_lib)
            kernels = [name for name, op in (("cutlass", cutlass.FwOp), ("flash", flash.FwOp)) if op.is_available()]
            ok = bool(kernels)
            why = (f"xformers {_version()} kernels: {', '.join(kernels) or 'none'}"
                   + (f"; {ext}" if ext else "; its C++/CUDA extension loaded"))
    _state["ok"], _state["why"] = ok, why
    return ok, why


def extension_problem(cpp_lib=None) -> str:
    """Why xformers' own C++/CUDA extension did not load ("" if it did). Without it,
    ``memory_efficient_attention`` still runs on PyTorch's built-in CUTLASS / flash kernels when the
    torch schema matches, but xformers' own kernels (flash-3, sparse, SwiGLU) are missing."""
    if cpp_lib is None:
        from xformers import _cpp_lib as cpp_lib
    err = cpp_lib._cpp_library_load_exception
    if err is None:
        return ""
    built = _build_info()
    if built.get("torch"):
        return (f"its C++/CUDA extension did not load: it was built for torch {built['torch']} "
                f"(python {built.get('python')}), this is torch {torch.__version__} "
                f"(python {platform.python_version()}); pip install 'mmar[xformers]' installs the matching pair")
    return f"its C++/CUDA extension did not load: {str(err).splitlines()[0]}"


def _version() -> str:
    try:
        return importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def xformers_available() -> bool:
    """True when xformers imports and a memory-efficient CUDA kernel of it can run."""
    return xformers_status()[0]


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
    if not xformers_available() or query.device.type not in KERNEL_DEVICES:
        _fallback_warning(xformers_status()[1] if query.device.type in KERNEL_DEVICES else
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


def runs_as(implementation: str | None) -> str:
    """What ``attn_implementation=implementation`` really runs on this machine."""
    impl = implementation or "sdpa"
    if impl == NAME:
        ok, why = xformers_status()
        return f"xformers memory_efficient_attention ({why})" if ok else f"PyTorch SDPA, falling back from xformers: {why}"
    if impl == "sdpa":
        return "PyTorch SDPA" + (" (flash / memory-efficient / math CUDA kernels)" if torch.cuda.is_available()
                                 else " (CPU: flash-CPU / math kernels)")
    return impl


def _module_attention(module: torch.nn.Module) -> str:
    """The attention inside a part: transformers' setting, diffusers' processors, torch's MHA, or none."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is not None and not isinstance(config, dict):
        return f"attn_implementation={impl!r} -> {runs_as(impl)}"
    processors = {type(m.processor).__name__ for m in module.modules() if hasattr(m, "processor")}
    if processors:
        return f"diffusers {', '.join(sorted(processors))} (PyTorch SDPA)"
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules()):
        return "torch.nn.MultiheadAttention (PyTorch SDPA)"
    return "no attention"


def attention_report(model, processor=None) -> list[tuple[str, str]]:
    """``[(part, attention it runs)]`` for an MMAR model's backbone, heads and modality tokenizers."""
    rows = [(f"backbone ({model.config.backbone_config.model_type})", _module_attention(model.backbone))]
    rows += [(f"{m} head ({type(h).__name__})", _module_attention(h)) for m, h in model.heads.items()]
    for m, tok in (getattr(processor, "modality_tokenizers", None) or {}).items():
        parts = [tok] if isinstance(tok, torch.nn.Module) else [
            v for v in vars(tok).values() if isinstance(v, torch.nn.Module)]
        kinds = sorted({_module_attention(p) for p in parts}) or ["no attention"]
        rows.append((f"{m} tokenizer ({type(tok).__name__})", "; ".join(kinds)))
    return rows


AttentionInterface.register(NAME, xformers_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
