"""GPU check: what the CPU machines here cannot verify, in one run of under 8 minutes on one GPU.

1. xformers attention equals SDPA: causal, padded, packed and KV-cached (generation);
2. bf16 training of a ~100M-parameter model for 50 steps: the loss falls; tokens/s; MFU against the
   card's bf16 peak (``--peak_tflops``, else a table of known cards);
3. bf16 generation equals fp32 within tolerance (hidden states, greedy text, image latents);
4. torch.compile (the trainer's ``--torch_compile``: decoder layers in place) of a training step and
   of the decode step: speed-up against eager;
5. peak memory of each check.

    python benchmarks/gpu_check.py            # on a CUDA machine; --write puts the table in BENCHMARKS.md
    python benchmarks/gpu_check.py --device cpu   # the same checks at toy size (tests the script itself)

Without CUDA (and without ``--device cpu``) it says so and exits 0. On CPU the xformers check runs
against a plain reference kernel (xformers has no CPU kernels), and there is no MFU (no known peak).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402

BIG = dict(hidden=768, layers=12, heads=12, vocab=8000, head_width=1024)  # ~100M parameters
TOY = dict(hidden=32, layers=2, heads=4, vocab=300, head_width=32)
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165,
                    "3090": 71, "A6000": 155}  # dense bf16 tensor-core peaks from the vendors' sheets


def make(size: dict, device: str, attn: str = "sdpa"):
    from mmar import MMARProcessor, build_model, build_tokenizer
    from mmar.datasets import DigitsDataset
    from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer

    torch.manual_seed(0)
    tok = train_bpe_tokenizer(DigitsDataset.texts(), vocab_size=size["vocab"])
    add_modality_tokens(tok, ["image"])
    mods = {"image": {"tokenizer": {"name": "image-patch", "image_size": 8, "patch_size": 2},
                      "head": {"width": size["head_width"], "depth": 3, "num_inference_steps": 10}}}
    backbone = {"model_type": "llama", "hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
                "num_attention_heads": size["heads"], "num_key_value_heads": size["heads"] // 2,
                "intermediate_size": 4 * size["hidden"], "max_position_embeddings": 1024, "attn_implementation": attn}
    model = build_model(backbone, tok, mods).to(device)
    return model, MMARProcessor(tok, {"image": build_tokenizer(mods["image"]["tokenizer"])})


def peak_memory(device: str) -> str:
    if device == "cuda":
        mb = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
        return f"{mb:.0f} MB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS (process)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batch_on(b: dict, device: str) -> dict:
    return {k: ({m: v.to(device) for m, v in t.items()} if isinstance(t, dict) else
                t.to(device) if torch.is_tensor(t) else t) for k, t in b.items()}


def reference_kernel():
    """On CPU: memory_efficient_attention's contract in plain torch (as tests/test_attention.py)."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import AttentionBias

    from mmar import attention

    def mea(q, k, v, attn_bias=None, p=0.0, scale=None):
        s = torch.einsum("bmhk,bnhk->bhmn", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if isinstance(attn_bias, AttentionBias):
            s = s + attn_bias.materialize(s.shape, dtype=s.dtype)
        elif attn_bias is not None:
            s = s + attn_bias
        return torch.einsum("bhmn,bnhk->bmhk", s.softmax(-1), v)

    xops.memory_efficient_attention = mea
    attention._state.update(ok=True, why="reference kernel (CPU dry run)")
    attention.KERNEL_DEVICES = {"cuda", "cpu"}


def check_xformers(size: dict, device: str) -> list[dict]:
    """Hidden states of an xformers model against the same SDPA model: causal, padded, packed; then
    cached generation (token ids and latents)."""
    from mmar import attention
    from mmar.datasets import DigitsDataset
    from mmar.generation import generate
    from mmar.types import Message

    if device == "cpu":
        reference_kernel()
    ok, why = attention.xformers_status()
    if not ok:
        return [{"check": "xformers = SDPA", "result": "skipped", "detail": why, "memory": ""}]
    sdpa, proc = make(size, device)
    xf = copy.deepcopy(sdpa)
    xf.set_attn_implementation("xformers")
    ds = DigitsDataset()
    enc = [proc.encode(ds[i]) for i in range(0, 2000, 125)]
    same = proc.collate([enc[0]] * 4)  # equal lengths: no mask, the causal bias
    cases = {"causal": same, "padded": proc.collate(enc), "packed": proc.pack(enc, 128)}
    rows = []
    for name, b in cases.items():
        b = batch_on(b, device)
        args = (b["input_ids"], b.get("attention_mask"), b["position_ids"])
        with torch.no_grad():
            d = (sdpa(*args, values=b["values"]).hidden_states - xf(*args, values=b["values"]).hidden_states).abs().max()
        rows.append({"check": f"xformers = SDPA ({name})", "result": "pass" if d < 1e-4 else "FAIL",
                     "detail": f"max abs diff {d:.1e} (fp32, tolerance 1e-4)", "memory": peak_memory(device)})
    prompts = [[Message("user", "draw the digit seven")], [Message("user", "a 3 and then a 4:")]]
    b = batch_on(proc.collate([proc.encode(p, add_generation_prompt=True, start_modality="image") for p in prompts],
                              padding_side="left"), device)
    outs = [generate(m, b["input_ids"], b["attention_mask"], b["values"], mode="image", guidance_scale=2.0,
                     max_items=1, max_new_tokens=3, generator=[torch.Generator(device).manual_seed(i) for i in range(2)])
            for m in (sdpa, xf)]
    d = max((ra[0][1] - rb[0][1]).abs().max().item() for ra, rb in zip(outs[0].segments, outs[1].segments))
    same_ids = outs[0].token_ids == outs[1].token_ids
    rows.append({"check": "xformers = SDPA (KV-cached generation)", "result": "pass" if same_ids and d < 1e-3 else "FAIL",
                 "detail": f"same tokens: {same_ids}, latents max abs diff {d:.1e} (tolerance 1e-3)",
                 "memory": peak_memory(device)})
    return rows


def digits_batches(proc, n: int, batch: int, device: str) -> list[dict]:
    from mmar.datasets import DigitsDataset

    ds = DigitsDataset(pairs_per_image=1.0)
    return [batch_on(proc([ds[(i * batch + j) % len(ds)] for j in range(batch)]), device) for i in range(n)]


def train_steps(model, batches, device: str, opt=None):
    """bf16 autocast training steps with the trainer's AdamW; returns (losses, seconds, tokens)."""
    from mmar.training.trainer import make_optimizer

    opt = opt or make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], 3e-4, 0.95)
    losses, tokens = [], 0
    sync(device)
    start = time.perf_counter()
    for b in batches:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(b["attention_mask"].sum())
    sync(device)
    return losses, time.perf_counter() - start, tokens, opt


def peak_flops(device: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def check_training(size: dict, device: str, steps: int, batch: int, peak_tflops: float | None):
    from torch.utils.flop_counter import FlopCounterMode

    model, proc = make(size, device)
    model.train()
    batches = digits_batches(proc, steps, batch, device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device, dtype=torch.bfloat16):
        model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    losses, secs, tokens, _ = train_steps(model, batches, device)
    k = max(1, steps // 5)
    falls = sum(losses[-k:]) / k < sum(losses[:k]) / k
    peak = peak_flops(device, peak_tflops)
    achieved = flops * steps / secs
    mfu = f", MFU {achieved / peak:.0%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ", MFU: no known peak"
    n = sum(p.numel() for p in model.parameters())
    row = {"check": f"bf16 training, {n / 1e6:.1f}M params, {steps} steps", "result": "pass" if falls else "FAIL",
           "detail": f"loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}, {tokens / secs:,.0f} tokens/s, "
                     f"{achieved / 1e12:.1f} TFLOP/s{mfu}", "memory": peak_memory(device)}
    return row, model, proc


def check_bf16_generation(model, proc, device: str) -> dict:
    """The trained model in fp32 and in bf16: hidden states, greedy text and image latents."""
    from mmar.generation import generate
    from mmar.types import Message

    fp32 = model.eval().float()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    b = digits_batches(proc, 1, 16, device)[0]
    with torch.no_grad():
        a = fp32(b["input_ids"], b["attention_mask"], values=b["values"]).hidden_states
        h = bf16(b["input_ids"], b["attention_mask"], values=b["values"]).hidden_states.float()
    rel = ((a - h).norm() / a.norm()).item()
    prompts = [[Message("user", "draw the digit seven")], [Message("user", "which digit is this?")]]
    enc = proc.collate([proc.encode(prompts[0], add_generation_prompt=True, start_modality="image")],
                       padding_side="left")
    enc = batch_on(enc, device)
    outs = [generate(m, enc["input_ids"], enc["attention_mask"], enc["values"], mode="image", max_items=1,
                     max_new_tokens=2, generator=torch.Generator(device).manual_seed(0)) for m in (fp32, bf16)]
    la, lb = outs[0].segments[0][0][1].float(), outs[1].segments[0][0][1].float()
    lat = ((la - lb).norm() / la.norm()).item()
    ok = rel < 0.05 and lat < 0.15
    return {"check": "bf16 generation = fp32", "result": "pass" if ok else "FAIL",
            "detail": f"hidden states rel. error {rel:.3f} (tolerance 0.05), image latents rel. error {lat:.3f} "
                      "(tolerance 0.15, same noise)", "memory": peak_memory(device)}


def check_compile_training(size: dict, device: str, steps: int, batch: int) -> dict:
    from mmar.training.trainer import compile_blocks

    rows = {}
    for kind in ("eager", "compiled"):
        model, proc = make(size, device)
        model.train()
        if kind == "compiled":
            compile_blocks(model)
        batches = digits_batches(proc, steps + 2, batch, device)
        start = time.perf_counter()
        _, _, _, opt = train_steps(model, batches[:2], device)  # warm-up (and compilation)
        warm = time.perf_counter() - start
        _, secs, tokens, _ = train_steps(model, batches[2:], device, opt)
        rows[kind] = (tokens / secs, warm)
    speed = rows["compiled"][0] / rows["eager"][0]
    return {"check": "torch.compile, training step", "result": f"{speed:.2f}x",
            "detail": f"{rows['eager'][0]:,.0f} -> {rows['compiled'][0]:,.0f} tokens/s (bf16); compile "
                      f"{rows['compiled'][1]:.0f}s", "memory": peak_memory(device)}


def check_compile_decode(size: dict, device: str, new_tokens: int) -> dict:
    """Greedy text decoding (KV cache) with the decoder layers eager, then compiled."""
    from mmar.generation import generate
    from mmar.training.trainer import compile_blocks
    from mmar.types import Message

    model, proc = make(size, device)
    model.eval()
    b = batch_on(proc.collate([proc.encode([Message("user", "which digit is this?")], add_generation_prompt=True)] * 8,
                              padding_side="left"), device)
    suppress = [i for i in proc.tokenizer.all_special_ids if i != proc.eos_id]

    def run():
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            generate(model, b["input_ids"], b["attention_mask"], mode="text", temperature=0.0,
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, suppress_ids=suppress)
        sync(device)
        return time.perf_counter() - start

    run()
    eager = min(run() for _ in range(2))
    compile_blocks(model)
    warm = run()
    compiled = min(run() for _ in range(2))
    n = 8 * new_tokens
    return {"check": "torch.compile, decode step", "result": f"{eager / compiled:.2f}x",
            "detail": f"{n / eager:,.0f} -> {n / compiled:,.0f} tokens/s (fp32, batch 8, {new_tokens} tokens); "
                      f"compile {warm:.0f}s", "memory": peak_memory(device)}


def table(rows: list[dict]) -> list[str]:
    lines = ["| check | result | detail | peak memory |", "|---|---|---|---|"]
    return lines + [f"| {r['check']} | {r['result']} | {r['detail']} | {r['memory']} |" for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 50 on cuda, 4 on cpu)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak")
    ap.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (run it on a GPU machine, or --device cpu for a toy dry run)")
        return 0
    cuda = args.device == "cuda"
    size, steps, batch = (BIG, args.steps or 50, 32) if cuda else (TOY, args.steps or 4, 4)
    start = time.time()
    rows = check_xformers(size, args.device)
    row, model, proc = check_training(size, args.device, steps, batch, args.peak_tflops)
    rows += [row, check_bf16_generation(model, proc, args.device)]
    del model
    rows.append(check_compile_training(size, args.device, 20 if cuda else 2, batch))
    rows.append(check_compile_decode(size, args.device, 64 if cuda else 4))
    where = torch.cuda.get_device_name() if cuda else "CPU (toy sizes: a dry run of the script)"
    lines = ["## GPU check", "", f"`python benchmarks/gpu_check.py{'' if cuda else ' --device cpu'}` on {where}, "
             f"{machine()}; {time.time() - start:.0f}s in all.", "", *table(rows)]
    print("\n".join(lines))
    if args.write:
        update_section("gpu-check", "\n".join(lines))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
