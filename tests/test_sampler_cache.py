"""The sampler's cache options change nothing but speed: a static KV cache, a chunked prefill and a
compiled decode step give the tokens of the default dynamic cache."""

import weakref

import pytest
import torch

from mmar import Message
from mmar.generation import generate
from mmar.generation import sampler as sampler_module


def _batch(proc, prompts, start=None):
    enc = [proc.encode(p, add_generation_prompt=True, start_modality=start) for p in prompts]
    return proc.collate(enc, padding_side="left")


def _run(model, proc, b, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(b["input_ids"].shape[0])]
    return generate(model, b["input_ids"], b["attention_mask"], b["values"], generator=gens,
                    decode_text=proc.decode_text, **kw)


def _same(a, b, atol=1e-4):
    assert a.token_ids == b.token_ids
    for ra, rb in zip(a.segments, b.segments):
        assert len(ra) == len(rb)
        for sa, sb in zip(ra, rb):
            assert sa == sb if isinstance(sa, str) else torch.allclose(sa[1], sb[1], atol=atol)


PROMPTS = [[Message("user", "draw the digit seven")], [Message("user", "a 3 and then a 4, please, and a 5")]]


@pytest.mark.parametrize("mode,guidance", [("image", 3.0), ("auto", 2.0), ("text", 1.0)])
def test_static_cache_and_chunked_prefill_equal_the_dynamic_cache(tiny, mode, guidance):
    model, proc = tiny
    b = _batch(proc, PROMPTS, start="image" if mode == "image" else None)
    assert b["input_ids"].shape[1] > 6  # so that a chunk of 3 really splits the prompt
    kw = dict(mode=mode, guidance_scale=guidance, max_new_tokens=6, max_items=1, temperature=1.0)
    ref = _run(model, proc, b, **kw)
    _same(ref, _run(model, proc, b, cache_implementation="static", **kw))
    _same(ref, _run(model, proc, b, prefill_chunk_size=3, **kw))
    _same(ref, _run(model, proc, b, prefill_chunk_size=3, cache_implementation="static", **kw))


def test_compiled_static_step_equals_eager(tiny, monkeypatch):
    model, proc = tiny
    monkeypatch.setitem(sampler_module.COMPILE_OPTIONS, "backend", "eager")  # graph capture without codegen
    monkeypatch.setattr(sampler_module, "_COMPILED", weakref.WeakKeyDictionary())
    b = _batch(proc, PROMPTS[:1], start="image")
    kw = dict(mode="image", guidance_scale=3.0, max_new_tokens=3, max_items=1, cache_implementation="static")
    _same(_run(model, proc, b, **kw), _run(model, proc, b, compile=True, **kw))
    assert model in sampler_module._COMPILED  # the compiled step really ran
