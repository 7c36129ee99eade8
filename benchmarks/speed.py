"""Speed benchmarks, ours against a baseline in the same run:

1. text decoding tokens/s: mmar's interleaved sampler against Hugging Face ``generate()`` on the same
   backbone (greedy, KV cache, batch of 8);
2. image generation with against without KV cache at 16, 64 and 256 image tokens;
3. training MFU of a hidden-1024 configuration against this machine's fp32 matmul peak (FLOPs of a
   real training step counted by ``torch.utils.flop_counter``). The peak is measured interleaved with the
   training steps, in the same run (step, matmul, step, matmul, ...), and each is the best of its
   rounds, so a machine that slows down mid-run slows both sides alike instead of flattering the ratio.

    python benchmarks/speed.py            # writes the section "speed" of BENCHMARKS.md
    python benchmarks/speed.py --quick    # tiny sizes, a smoke run of every benchmark; prints, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402

from mmar import MMARProcessor, build_model, build_tokenizer  # noqa: E402
from mmar.datasets import DigitsDataset  # noqa: E402
from mmar.generation import generate  # noqa: E402
from mmar.sequence import Message  # noqa: E402
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer  # noqa: E402
from mmar.training.trainer import make_optimizer  # noqa: E402


def make(hidden=192, layers=4, image_size=8, vocab=512, heads=4, inter=None, head_width=256):
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(DigitsDataset.texts(), vocab_size=vocab)
    add_modality_tokens(tok, ["image"])
    mods = {"image": {"tokenizer": {"name": "image-patch", "image_size": image_size, "patch_size": 2},
                      "head": {"width": head_width, "depth": 3, "num_inference_steps": 25}}}
    backbone = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": heads,
                "intermediate_size": inter or 4 * hidden, "max_position_embeddings": 2048}
    model = build_model(backbone, tok, mods).eval()
    proc = MMARProcessor(tok, {"image": build_tokenizer(mods["image"]["tokenizer"])})
    return model, proc


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def bench_decode(new_tokens=64, batch=8):
    model, proc = make()
    prompts = [[Message("user", "which digit is this?")]] * batch
    b = proc.collate([proc.encode(p, add_generation_prompt=True) for p in prompts], padding_side="left")
    suppress = [i for i in proc.tokenizer.all_special_ids if i != proc.eos_id]
    ours_out = generate(model, b["input_ids"], b["attention_mask"], mode="text", temperature=0.0,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, suppress_ids=suppress)
    assert all(len(ids) == new_tokens + 1 for ids in ours_out.token_ids)  # 64 tokens + the forced EOS
    ours = best_of(lambda: generate(model, b["input_ids"], b["attention_mask"], mode="text", temperature=0.0,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, suppress_ids=suppress))
    hf = best_of(lambda: model.backbone.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 do_sample=False, pad_token_id=proc.pad_id))
    n = batch * new_tokens
    return {"ours": n / ours, "hf": n / hf}


@torch.no_grad()
def bench_kv_cache(image_size: int, guidance=3.0, hidden=512, layers=8):
    model, proc = make(image_size=image_size, hidden=hidden, layers=layers, heads=8)
    b = proc.collate([proc.encode([Message("user", "draw the digit seven")], add_generation_prompt=True,
                                  start_modality="image")], padding_side="left")

    head, head_time = model.heads["image"], [0.0]
    sample = head.sample

    def timed_sample(*args, **kwargs):  # the diffusion head's share, which the cache cannot shorten
        start = time.perf_counter()
        out = sample(*args, **kwargs)
        head_time[0] += time.perf_counter() - start
        return out

    head.sample = timed_sample

    def run(cache):
        head_time[0] = 0.0
        start = time.perf_counter()
        generate(model, b["input_ids"], b["attention_mask"], mode="image", guidance_scale=guidance,
                 max_items=1, max_new_tokens=1, num_inference_steps=25, use_cache=cache,
                 generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start, head_time[0]

    n = proc.modality_tokenizers["image"].num_tokens()
    (cached, head_c), (uncached, head_u) = (min(run(c) for _ in range(2)) for c in (True, False))
    return {"tokens": n, "cached": cached, "uncached": uncached, "head_cached": head_c, "head_uncached": head_u}


def matmul_peak(n=2048, repeat=5) -> float:
    """fp32 FLOP/s of an ``n`` x ``n`` matmul, the best of ``repeat``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    secs = best_of(lambda: a @ b, repeat)
    return 2 * n ** 3 / secs


MFU_SIZES = {"full": dict(hidden=1024, layers=4, heads=16, inter=2816, head_width=1024, batch=16, rounds=5, n=2048),
             "quick": dict(hidden=64, layers=2, heads=4, inter=128, head_width=64, batch=4, rounds=2, n=256)}


def bench_mfu(size: str = "full"):
    """Training MFU against the matmul peak, measured alternately in one run: ``rounds`` times one training
    step then the matmul (best of 3); MFU = the best step's FLOP/s over the best peak seen."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = MFU_SIZES[size]
    batch, rounds = cfg["batch"], cfg["rounds"]
    model, proc = make(hidden=cfg["hidden"], layers=cfg["layers"], heads=cfg["heads"], inter=cfg["inter"],
                       head_width=cfg["head_width"])
    model.train()
    ds = DigitsDataset(pairs_per_image=1.0)
    opt = make_optimizer([{"params": list(model.parameters())}], 1e-4, 0.95)  # the trainer's (fused) AdamW
    batches = [proc([ds[i * batch + j] for j in range(batch)]) for i in range(rounds + 1)]

    def step(b):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batches[1]).loss.backward()
    flops_per_step = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    step_secs, peaks = [], []
    for b in batches[1:]:
        start = time.perf_counter()
        step(b)
        step_secs.append(time.perf_counter() - start)
        peaks.append(matmul_peak(cfg["n"], repeat=3))
    secs, peak = min(step_secs), max(peaks)
    return {"params": sum(p.numel() for p in model.parameters()), "flops_per_step": flops_per_step,
            "s_per_step": secs, "achieved": flops_per_step / secs, "peak": peak, "mfu": flops_per_step / secs / peak,
            "peak_range": (min(peaks), peak), "step_range": (secs, max(step_secs)), "rounds": rounds, "n": cfg["n"]}


def why_missed(checks, kv64: dict) -> list[str]:
    missed = {name for name, v, t in checks if v < t}
    out = []
    if any(name.startswith("KV cache") for name in missed):
        head = kv64["head_cached"] / kv64["tokens"] * 1e3
        backbone = (kv64["uncached"] - kv64["head_uncached"]) / (kv64["cached"] - kv64["head_cached"])
        out.append(f"KV cache: at 64 tokens the diffusion head takes {head:.1f} ms of every token in both runs; "
                   f"the backbone alone runs {backbone:.1f}x faster with the cache. A one-token decode step "
                   "on a CPU is bound by reading the weights (~100 MB for hidden 512 x 8 layers), while "
                   "recomputing 64 tokens is compute-bound and uses the matmul units well, so the cache's "
                   "gain on this machine is smaller than the FLOP ratio suggests and grows with length.")
    if any(name.startswith("decoding") for name in missed):
        out.append("Decoding: the sampler keeps per-row state for interleaving (items, CFG rows) in Python; on a "
                   "model this small each step is ~1-2 ms, so that book-keeping is a visible share.")
    if any(name.startswith("MFU") for name in missed):
        out.append("MFU: a digits step is many small ops (the diffusion head's 640-row MLPs, norms, the "
                   "scatter of image tokens) beside the big matmuls; those run far below the matmul peak.")
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every speed benchmark; write the section "speed" of BENCHMARKS.md (not with ``--quick``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run): print only, write nothing")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        dec = bench_decode(new_tokens=4, batch=2)
        kv = [bench_kv_cache(s, hidden=64, layers=2) for s in (4, 8, 8)]
        kv_small = bench_kv_cache(8, hidden=64, layers=2)
    else:
        dec = bench_decode()
        kv = [bench_kv_cache(s) for s in (8, 16, 32)]
        kv_small = bench_kv_cache(16, hidden=192, layers=4)
    mfu = bench_mfu("quick" if args.quick else "full")
    peak = mfu["peak"]
    lines = [
        "## Speed: decoding, KV cache, MFU",
        "",
        f"`python benchmarks/speed.py` on {machine()}.",
        "",
        "| benchmark | mmar | baseline | ratio |",
        "|---|---|---|---|",
        f"| text decoding, greedy, batch 8 x 64 tokens (3.2M model) | {dec['ours']:.0f} tok/s | "
        f"HF `generate()` {dec['hf']:.0f} tok/s | **{dec['ours'] / dec['hf']:.2f}x** |",
    ]
    for r in kv:
        lines.append(f"| image generation, {r['tokens']} image tokens, CFG, DDIM 25 (hidden 512 x 8 layers) | "
                     f"KV cache {r['cached']:.2f} s | no cache {r['uncached']:.2f} s | "
                     f"**{r['uncached'] / r['cached']:.1f}x** faster |")
    lines.append(f"| same, 64 tokens, the 3.2M digits backbone (hidden 192 x 4) | KV cache {kv_small['cached']:.2f} s | "
                 f"no cache {kv_small['uncached']:.2f} s | **{kv_small['uncached'] / kv_small['cached']:.1f}x** faster |")
    lines += [
        f"| training MFU, hidden 1024 x 4 layers ({mfu['params'] / 1e6:.0f}M params), batch 16 | "
        f"{mfu['achieved'] / 1e9:.0f} GFLOP/s | fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (same run) | "
        f"**{mfu['mfu']:.0%}** |",
        "",
        "KV-cache growth: cached time per image token " +
        ", ".join(f"{r['tokens']}: {1e3 * r['cached'] / r['tokens']:.1f} ms" for r in kv) +
        "; uncached " + ", ".join(f"{r['tokens']}: {1e3 * r['uncached'] / r['tokens']:.1f} ms" for r in kv) + ".",
        "",
        "| image tokens | diffusion head per token | backbone per token, KV cache | backbone per token, no cache "
        "| backbone alone: cache speed-up |",
        "|---|---|---|---|---|",
        *[f"| {r['tokens']} | {1e3 * r['head_cached'] / r['tokens']:.1f} ms | "
          f"{1e3 * (r['cached'] - r['head_cached']) / r['tokens']:.1f} ms | "
          f"{1e3 * (r['uncached'] - r['head_uncached']) / r['tokens']:.1f} ms | "
          f"{(r['uncached'] - r['head_uncached']) / (r['cached'] - r['head_cached']):.1f}x |" for r in kv],
        "",
        "The head's 25 DDIM steps per token cost the same with or without the cache, so they bound the "
        "end-to-end ratio; the backbone-alone column is what the cache itself buys.",
        f"MFU counts the FLOPs of one real training step (forward + backward, {mfu['flops_per_step'] / 1e9:.0f} "
        "GFLOP, `torch.utils.flop_counter`) over its measured time. The peak is measured in the same run, "
        f"alternating with the steps ({mfu['rounds']} rounds of one step then a {mfu['n']}x{mfu['n']} fp32 matmul, "
        "best of 3), and MFU is the best step against the best peak: "
        f"step {mfu['step_range'][0]:.2f}-{mfu['step_range'][1]:.2f} s, peak {mfu['peak_range'][0] / 1e9:.0f}-"
        f"{mfu['peak_range'][1] / 1e9:.0f} GFLOP/s over the rounds (the machine speed this run saw).",
    ]
    kv64 = kv[1]["uncached"] / kv[1]["cached"]
    checks = [("decoding >= 0.95x HF generate()", dec["ours"] / dec["hf"], 0.95),
              ("KV cache >= 3x at 64 image tokens", kv64, 3.0), ("MFU >= 50% of peak", mfu["mfu"], 0.5)]
    lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if v >= t else f'missed ({v:.2f} vs {t})'}"
                                      for name, v, t in checks) + ".",
              *why_missed(checks, kv[1]),
              "Timings on a shared 2-core machine vary by 10-30% between runs."]
    if args.quick:
        lines.insert(1, "(--quick: tiny sizes, not the ones the rows name; nothing written)")
    else:
        update_section("speed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
