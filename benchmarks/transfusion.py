"""Training speed and quality in the same wall-clock: mmar against transfusion-pytorch on the digits task.

Both models train on the same samples in the same order (mmar's digits dataset; transfusion gets the same
prompts / answers as mmar's text-tokenizer ids and the same 8x8 images as 16 patch tokens of 4 values),
with the same batch size, AdamW settings, warm-up and a cosine decay over the *time* budget, on the same
threads. Training alternates between the two in slices of ``--slice`` seconds, so background load on a
shared machine hits both alike. Tokens are counted the same way for both: mmar's sequence length of each
sample (its text tokens, special tokens included, + 16 per image), whatever the model does internally.

Transfusion's transformer matches mmar's backbone (width, depth, heads, FFN width); it is also the image
denoiser (flow matching with AdaLN time conditioning in every layer, bidirectional attention inside an
image), where mmar adds a small per-token diffusion head. After training, both are judged the same way:
text-to-image by mmar's SVC digit judge (CFG 3.0), image-to-text (greedy) on the 360 held-out digits.

    pip install -e ".[bench]"
    python benchmarks/transfusion.py [--seconds 240] [--slice 15] [--profile 0]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # transfusion's samplers open progress bars unconditionally
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402

from mmar.datasets.digits import i2t_prompt, load_digit_split, t2i_prompt  # noqa: E402
from mmar.eval.digits import classify, fit_classifier, parse_digit  # noqa: E402
from mmar.sequence import Image, Message, Text  # noqa: E402

NUM_IMAGE_TOKENS = 16


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, used_s: float, budget_s: float, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base`` over the time budget."""
    frac = min(used_s / budget_s, 1.0)
    return base * min(1.0, (step + 1) / max(warmup, 1)) * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# -- the transfusion side --------------------------------------------------------------------------
def build_transfusion(margs, processor, prob_uncond: float):
    from loguru import logger
    from transfusion_pytorch import Transfusion

    logger.disable("transfusion_pytorch")  # one INFO line per sampled sequence otherwise

    bb = margs.backbone
    hidden, heads = bb["hidden_size"], bb["num_attention_heads"]
    # FeedForward's GEGLU width is int(dim * expansion * 2 / 3): choose the expansion that gives mmar's FFN width
    expansion = bb["intermediate_size"] * 3 / (2 * hidden)
    token_dim = processor.modality_tokenizers["image"].token_dim
    return Transfusion(
        num_text_tokens=len(processor.tokenizer), dim_latent=token_dim, channel_first_latent=False,
        modality_default_shape=(NUM_IMAGE_TOKENS,), modality_num_dim=1, add_pos_emb=True,
        transformer=dict(dim=hidden, depth=bb["num_hidden_layers"], heads=heads, dim_head=hidden // heads,
                         ff_expansion_factor=expansion),
        prob_uncond=prob_uncond)


def to_transfusion(sample: list[Message], processor, rng: random.Random) -> tuple[list, list[float]]:
    """One chat sample as transfusion's list of items, and the flow times of its images.

    Text segments become mmar's token ids (loss only on the assistant's, like mmar); images become the
    same ``[16, 4]`` patch tokens. A prompt image is clean (time 1, no flow loss: it is read, not drawn);
    answer images follow transfusion's default time draw (earlier ones at 0.5, the rest at one random time)."""
    items, times, answer_times = [], [], []
    answer_images = sum(isinstance(s, Image) for m in sample if m.role == "assistant" for s in m.content)
    current = rng.randrange(answer_images) if answer_images else 0
    t_now = rng.random()
    for msg in sample:
        train = msg.role == "assistant"
        for seg in msg.content:
            if isinstance(seg, Text):
                items.append((torch.tensor(processor.encode_text(seg.text)), 1.0 if train else 0.0))
            else:
                _, tokens = processor.encode_item(seg)
                if train:
                    times.append(0.5 if len(answer_times) < current else t_now)
                    answer_times.append(times[-1])
                else:
                    times.append(1.0)
                items.append((0, tokens, 1.0 if train else 0.0))
    return items, times


def transfusion_batch(samples, processor, rng):
    conv = [to_transfusion(s, processor, rng) for s in samples]
    m = max(len(t) for _, t in conv)
    times = torch.tensor([t + [0.0] * (m - len(t)) for _, t in conv])
    return [items for items, _ in conv], times


@torch.no_grad()
def image_prefix(model) -> list[torch.Tensor]:
    """``[meta] 16 [som]``: what transfusion's training forward puts before every image. A prompt given as a
    list is taken as is, so an image inside it needs these (and its ``[eom]``) spelled out."""
    return [torch.tensor([model.meta_id]), model.char_tokenizer(str(NUM_IMAGE_TOKENS)),
            torch.tensor([model.som_ids[0]])]


def eval_transfusion(model, processor, clf, per_digit: int, guidance: float, steps: int, seed: int,
                     heldout: int | None = None, batch: int = 100) -> dict:
    model.eval()
    tok = processor.modality_tokenizers["image"]
    torch.manual_seed(seed)
    digits = [d for d in range(10) for _ in range(per_digit)]
    images, t0 = [], time.perf_counter()
    for k in range(0, len(digits), batch):
        chunk = digits[k: k + batch]
        prompts = [[torch.tensor(processor.encode_text(t2i_prompt(d, k + i)))] for i, d in enumerate(chunk)]
        out = model.sample_many(prompts, force_modality_at_start=(0, (NUM_IMAGE_TOKENS,)),
                                max_length=NUM_IMAGE_TOKENS - 1, modality_steps=steps, cfg_scale=guidance,
                                return_unprocessed_modalities=True, return_without_prompt=True)
        images += tok.decode(torch.stack([s[0].tensor for s in out]).clamp(-1, 1))
    t2i_s = time.perf_counter() - t0
    t2i = float(np.mean(classify(clf, images) == np.array(digits)))
    xte, yte = load_digit_split("test")
    xte, yte = xte[:heldout], yte[:heldout]
    answers, t0 = [], time.perf_counter()
    for k in range(0, len(yte), batch):
        idx = range(k, min(k + batch, len(yte)))
        qs = [processor.encode_text(i2t_prompt(i)) for i in idx]
        prompts = [[*image_prefix(model), (0, processor.encode_item(Image(xte[i]))[1]),
                    torch.tensor([model.eom_ids[0], *q])] for i, q in zip(idx, qs)]
        out = model.sample_many(prompts, max_length=3, text_temperature=0.0, return_unprocessed_modalities=True)
        for sample, q in zip(out, qs):
            seq = sample[-1].tolist()[1 + len(q):]  # after [eom] + the question
            seq = [t for t in seq if t < model.num_text_tokens]
            answers.append(processor.tokenizer.decode(seq, skip_special_tokens=True))
    i2t_s = time.perf_counter() - t0
    i2t = float(np.mean([parse_digit(a) == y for a, y in zip(answers, yte)]))
    print("transfusion answers (first 8):", answers[:8], "labels:", list(yte[:8]), flush=True)
    return {"t2i": t2i, "i2t": i2t, "t2i_s": t2i_s, "i2t_s": i2t_s, "images": images, "n_heldout": len(yte)}


# -- the loop ---------------------------------------------------------------------------------------
class Runner:
    """One system's training state: its model, optimizer, position in the shared batch order and time used."""

    def __init__(self, name, model, params, step_fn, targs, budget):
        self.name, self.model, self.step_fn, self.targs, self.budget = name, model, step_fn, targs, budget
        self.opt = torch.optim.AdamW(params, lr=targs.learning_rate, betas=(0.9, targs.adam_beta2))
        self.step, self.used, self.tokens, self.losses = 0, 0.0, 0, []

    def run_slice(self, batches, slice_s: float) -> None:
        end = min(self.used + slice_s, self.budget)
        self.model.train()
        while self.used < end:
            idx, n_tokens = batches(self.step)
            t0 = time.perf_counter()
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, self.used, self.budget, self.targs.learning_rate,
                                self.targs.warmup_steps, self.targs.min_lr_ratio)
            loss = self.step_fn(idx)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.targs.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.used += time.perf_counter() - t0
            self.step += 1
            self.tokens += n_tokens
            self.losses.append(float(loss))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--seconds", type=float, default=240.0, help="training budget of each system")
    ap.add_argument("--slice", type=float, default=15.0, help="alternate the two systems every this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--per_digit", type=int, default=10)
    ap.add_argument("--transfusion_steps", type=int, default=16, help="transfusion's ODE time points (its default)")
    ap.add_argument("--heldout", type=int, default=None, help="judge image-to-text on the first N held-out digits")
    ap.add_argument("--profile", type=int, default=0, help="profile this many mmar training steps first and print the table")
    ap.add_argument("--no_write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mmar.pipeline import MMARPipeline
    from mmar.training.arguments import build_arguments, load_yaml
    from mmar.training.data import Collator, build_dataset
    from mmar.training.trainer import build_everything, param_groups
    from mmar.eval.digits import evaluate_digits

    margs, dargs, targs = build_arguments(load_yaml(args.config), source=args.config)
    torch.manual_seed(targs.seed)
    dataset = build_dataset(dargs.dataset, "train", seed=targs.seed, pairs_per_image=dargs.pairs_per_image,
                            shift_prob=dargs.shift_prob, data_files=dargs.data_files)
    model, processor = build_everything(margs, dataset)
    collator = Collator(processor, margs.cond_dropout_prob, seed=targs.seed)
    tmodel = build_transfusion(margs, processor, margs.cond_dropout_prob)
    lengths = [len(processor.encode(dataset[i])) for i in range(len(dataset))]  # the shared token count

    order: list[int] = []
    gen = torch.Generator().manual_seed(targs.seed)

    def batches(step: int):
        while len(order) < (step + 1) * targs.batch_size:  # epochs of a fixed shuffled order, shared by both
            order.extend(torch.randperm(len(dataset), generator=gen).tolist())
        idx = order[step * targs.batch_size: (step + 1) * targs.batch_size]
        return idx, sum(lengths[i] for i in idx)

    def mmar_step(idx):
        return model(**collator([(i, dataset[i]) for i in idx])).loss

    trng = random.Random(targs.seed)

    def transfusion_step(idx):
        items, times = transfusion_batch([dataset[i] for i in idx], processor, trng)
        return tmodel(items, times=times)

    if args.profile:
        profile_mmar(model, mmar_step, batches, args.profile)

    runners = [Runner("mmar", model, param_groups(model, targs.weight_decay), mmar_step, targs, args.seconds),
               Runner("transfusion-pytorch", tmodel, param_groups(tmodel, targs.weight_decay), transfusion_step,
                      targs, args.seconds)]
    load_before = os.getloadavg()
    wall0 = time.time()
    while any(r.used < r.budget for r in runners):
        for r in runners:
            if r.used < r.budget:
                r.run_slice(batches, args.slice)
        print("  ".join(f"{r.name}: {r.step} steps, {r.used:.0f}s, {r.tokens / max(r.used, 1e-9):.0f} tok/s, "
                        f"loss {np.mean(r.losses[-10:]):.3f}" for r in runners), flush=True)
    load_after = os.getloadavg()
    wall = time.time() - wall0

    clf, _ = fit_classifier()
    m = evaluate_digits(None, pipeline=MMARPipeline(model, processor), guidance_scale=args.guidance_scale,
                        per_digit=args.per_digit, pairs=0)
    t = eval_transfusion(tmodel, processor, clf, args.per_digit, args.guidance_scale, args.transfusion_steps,
                         targs.seed, heldout=args.heldout)
    ours, theirs = runners
    speed = {r.name: r.tokens / r.used for r in runners}
    ratio = speed["mmar"] / speed["transfusion-pytorch"]
    res = {"speed": speed, "ratio": ratio, "mmar": m, "transfusion": t, "load": (load_before, load_after),
           "params": (n_params(model), n_params(tmodel)), "backbone_params": n_params(model.backbone),
           "transformer_params": n_params(tmodel.transformer), "steps": (ours.step, theirs.step), "wall": wall,
           "heads": n_params(model.heads)}
    report(args, margs, targs, res)


def profile_mmar(model, step_fn, batches, steps: int) -> None:
    """Where mmar's training step time goes: the profiler's top operators, and the share spent in the
    diffusion head (its loss, forward + backward, timed alone on the same hidden states)."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for s in range(2):  # warm-up
        step_fn(batches(s)[0]).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(steps):
            step_fn(batches(s)[0]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    head = model.heads["image"]
    cond = torch.randn(64 * 20, model.config.hidden_size)  # about one batch's image tokens
    target = torch.randn(cond.shape[0], head.token_dim)
    t0 = time.perf_counter()
    for _ in range(steps):
        head.loss(cond, target).backward()
    print(f"diffusion head alone, {cond.shape[0]} tokens x batch_mul {head.batch_mul}: "
          f"{(time.perf_counter() - t0) / steps * 1e3:.0f} ms per forward + backward", flush=True)
    model.zero_grad(set_to_none=True)


def report(args, margs, targs, r) -> None:
    bb = margs.backbone
    m, t = r["mmar"], r["transfusion"]
    (l1, l2), ratio = r["load"], r["ratio"]
    target_met = ratio >= 1.5
    lines = [
        "## Training speed and accuracy in the same wall-clock: mmar against transfusion-pytorch (digits)",
        "",
        f"`python benchmarks/transfusion.py --seconds {args.seconds:g} --slice {args.slice:g} --threads {args.threads}` "
        f"on {machine()}, "
        f"transfusion-pytorch {pkg_version('transfusion-pytorch')}. Load average (1/5/15 min) "
        f"{l1[0]:.1f}/{l1[1]:.1f}/{l1[2]:.1f} before and {l2[0]:.1f}/{l2[1]:.1f}/{l2[2]:.1f} after the "
        f"training (a shared machine: the two systems alternate every {args.slice:g} s, so load hits both alike).",
        "",
        f"Same transformer shape: width {bb['hidden_size']}, {bb['num_hidden_layers']} layers, "
        f"{bb['num_attention_heads']} heads, FFN width {bb['intermediate_size']} (mmar: Llama with SwiGLU; "
        "transfusion: its own transformer with GEGLU of the same width). Parameters: mmar "
        f"{r['params'][0] / 1e6:.2f}M ({r['backbone_params'] / 1e6:.2f}M backbone + {r['heads'] / 1e6:.2f}M "
        f"diffusion head + input projection); transfusion-pytorch {r['params'][1] / 1e6:.2f}M "
        f"({r['transformer_params'] / 1e6:.2f}M transformer, of which most is the AdaLN time conditioning of "
        "every attention and FFN block that makes the transformer itself the denoiser). Same data order, batch "
        f"{targs.batch_size}, AdamW lr {targs.learning_rate:g}, weight decay {targs.weight_decay:g}, "
        f"{targs.warmup_steps} warm-up steps, cosine decay over the time budget, clip {targs.max_grad_norm:g}, "
        f"condition dropout {margs.cond_dropout_prob:g}, {args.seconds:g} s of training each.",
        "",
        "| | mmar | transfusion-pytorch | ratio mmar / transfusion |",
        "|---|---|---|---|",
        f"| training tokens/s (text + image tokens per sample, same count for both) | "
        f"{r['speed']['mmar']:.0f} | {r['speed']['transfusion-pytorch']:.0f} | **{ratio:.2f}x** |",
        f"| training steps in {args.seconds:g} s (batch {targs.batch_size}) | {r['steps'][0]} | {r['steps'][1]} | "
        f"{r['steps'][0] / max(r['steps'][1], 1):.2f}x |",
        f"| text-to-image accuracy (100 images, CFG {args.guidance_scale:g}, SVC judge) | "
        f"{m['text_to_image_accuracy']:.0%} | {t['t2i']:.0%} | |",
        f"| image-to-text accuracy ({t['n_heldout']} held-out, greedy) | {m['image_to_text_accuracy']:.1%} | {t['i2t']:.1%} | |",
        "",
        f"Sampling: mmar DDIM {m['num_inference_steps']} steps of its diffusion head per image token (KV cache); "
        f"transfusion its default: an ODE over {args.transfusion_steps} time points (midpoint) of the whole "
        f"transformer on all 16 image tokens at once. Target mmar >= 1.5x transfusion-pytorch tokens/s: "
        + ("**met**." if target_met else f"**missed** ({ratio:.2f}x, short by {1.5 - ratio:.2f}x)."),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_section("transfusion", text)


def pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
