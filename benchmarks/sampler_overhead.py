"""The sampler's own overhead per token, old against new in one run.

The head is replaced by a zero-cost one (it returns zeros), so what a generated token costs is the
backbone step plus the sampler's book-keeping. The backbone's share is measured on its own (the same
number of cached decode steps, same batch, no sampler), and the overhead per token is the difference.
"old" is the sampler before the generation package (``benchmarks/legacy_sampler.py``, a frozen copy),
"new" is ``mmar.generation.generate``. Image generation with CFG (2 x batch backbone rows), per-row
generators, batch 1 and 32, items of 64 and 256 tokens.

    python benchmarks/sampler_overhead.py [--repeat 3] [--no_write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import legacy_sampler  # noqa: E402
from report import machine, update_section  # noqa: E402

from mmar import Message, MMARProcessor, build_model, build_tokenizer  # noqa: E402
from mmar.compat import CACHE  # noqa: E402
from mmar.data.digits import all_texts  # noqa: E402
from mmar.generation import generate  # noqa: E402
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer  # noqa: E402


def make(image_size: int, hidden: int = 64, layers: int = 2):
    """A small backbone (so the sampler's share is visible) and a zero-cost image head."""
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(all_texts(), vocab_size=300)
    add_modality_tokens(tok, ["image"])
    mods = {"image": {"tokenizer": {"name": "image-patch", "image_size": image_size, "patch_size": 2,
                                    "channels": 1}, "head": {"width": 32, "depth": 1}}}
    backbone = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
                "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 2 * hidden,
                "max_position_embeddings": 4096}
    model = build_model(backbone, tok, mods).eval()
    dim = model.config.modalities["image"]["token_dim"]
    model.heads["image"].sample = lambda cond, **kw: cond.new_zeros(cond.shape[0], dim)  # zero cost
    return model, MMARProcessor(tok, {"image": build_tokenizer(mods["image"]["tokenizer"])})


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def backbone_only(model, rows: int, prompt: int, steps: int):
    """``steps`` cached single-token decoder calls on ``rows`` rows after a prompt: no sampler at all."""
    hidden = model.config.backbone_config.hidden_size

    def run():
        x = torch.zeros(rows, prompt, hidden)
        mask = torch.ones(rows, prompt + steps, dtype=torch.long)
        out = model(inputs_embeds=x, attention_mask=mask[:, :prompt], use_cache=True)
        cache = out.cache
        for t in range(steps):
            pos = torch.full((rows, 1), prompt + t)
            out = model(inputs_embeds=x[:, :1], attention_mask=mask[:, :prompt + t + 1], position_ids=pos,
                        use_cache=True, **{CACHE: cache})
            cache = out.cache
    return run


@torch.no_grad()
def measure(image_size: int, batch: int, repeat: int, compile: bool) -> dict:
    model, proc = make(image_size)
    n = model.config.modalities["image"]["num_tokens"]
    enc = [proc.encode([Message("user", "draw a 3")], add_generation_prompt=True, start_modality="image")] * batch
    b = proc.collate(enc, padding_side="left")

    def sampler(fn, **options):
        def run():
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            fn(model, b["input_ids"], b["attention_mask"], b["values"], mode="image", guidance_scale=3.0,
               max_items=1, max_new_tokens=0, generator=gens, decode_text=proc.decode_text, **options)
        return run

    steps = n + 2  # the item's tokens, its end token, the EOS that follows
    runs = {"old": sampler(legacy_sampler.generate), "new": sampler(generate),
            "static": sampler(generate, cache_implementation="static"),
            **({"compiled": sampler(generate, cache_implementation="static", compile=True)} if compile else {}),
            "backbone": backbone_only(model, 2 * batch, b["input_ids"].shape[1], steps)}
    for run in runs.values():  # warm-up (and the compilation of the static step)
        run()
    times = {k: timed(run, repeat) for k, run in runs.items()}
    per_token = {k: 1e3 * v / steps for k, v in times.items()}  # ms per generated token (all rows at once)
    return {"tokens": n, "batch": batch, **{f"{k}_ms": v for k, v in per_token.items()},
            **{f"{k}_overhead_ms": per_token[k] - per_token["backbone"] for k in ("old", "new", "static")}}


def table(rows: list[dict]) -> str:
    lines = ["| image tokens | batch | backbone alone | old sampler | new sampler | new, static cache | "
             "new, static + compiled | overhead old | overhead new | overhead old / new | old / new end to end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["old_overhead_ms"] / r["new_overhead_ms"] if r["new_overhead_ms"] > 0 else float("inf")
        lines.append(f"| {r['tokens']} | {r['batch']} | {r['backbone_ms']:.2f} | {r['old_ms']:.2f} | "
                     f"{r['new_ms']:.2f} | {r['static_ms']:.2f} | {r.get('compiled_ms', float('nan')):.2f} | "
                     f"{r['old_overhead_ms']:.2f} | {r['new_overhead_ms']:.2f} | **{ratio:.2f}x** | "
                     f"{r['old_ms'] / r['new_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no_write", action="store_true", help="print, do not update BENCHMARKS.md")
    ap.add_argument("--compile", action="store_true", help="also time the compiled static step (inductor; slow "
                    "to compile on a CPU)")
    args = ap.parse_args(argv)
    rows = [measure(size, batch, args.repeat, args.compile) for size in (16, 32) for batch in (1, 32)]
    body = ("## Sampler overhead per token (zero-cost head)\n\n"
            "`python benchmarks/sampler_overhead.py`: image generation with CFG and per-row generators, the head "
            "replaced by one that returns zeros; backbone hidden 64 x 2 layers so the sampler's share shows. "
            "Times in ms per generated token (all rows at once). Overhead = sampler ms/token - the same decode "
            "steps of the backbone alone (dynamic cache). Compiled: `torch.compile` (inductor) of the static-cache "
            "decode step, compiled in the warm-up (`--compile`; nan when not run). Old = the sampler before "
            "the generation package (frozen copy), new = `mmar.generation`; both measured in this run "
            f"(best of {args.repeat}).\n\n" + table(rows) + f"\n\nMachine: {machine()}.\n")
    print(body)
    if not args.no_write:
        update_section("sampler_overhead", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
