"""mmar against its peers on the digits task, at matched parameters: transfusion-pytorch 0.20 and
autoregressive-diffusion-pytorch 0.4 (issue 15, and the peers' sampling speed of issue 13).

Every system trains from scratch on the same digits data in the same order, batch ``batch_size`` of the
config, on the same threads, alternating every ``--slice`` seconds so that load on a shared machine hits all
alike. Budgets (``--budget``): ``seconds`` gives each system the same wall-clock (``--seconds``); ``flops``
gives each the same training FLOPs, those of ``--flop_steps`` mmar steps (FLOPs of one step, forward and
backward, counted by ``torch.utils.flop_counter`` on a real batch).

* **Matched parameters** (``--match params``, the default): each peer keeps mmar's depth and head count and
  its width is the one whose parameter count is nearest mmar's total (embeddings and heads included).
  ``--match shape`` gives the peers mmar's backbone width instead (the old, flattering comparison:
  transfusion-pytorch then has about twice mmar's parameters).
* **Recipes** (``--recipes``): ``mmar`` is the config's (AdamW, weight decay, warm-up, cosine decay over the
  budget, gradient clip, condition dropout); ``own`` is each peer's recommended one — transfusion-pytorch's
  MNIST example (Adam lr 3e-4, clip 0.5, sampling from an EMA of beta 0.99, ``model.create_ema()``),
  autoregressive-diffusion-pytorch's ``ImageTrainer`` (Adam lr 3e-4, no clip, ``ema_pytorch.EMA`` with its
  defaults, sampling from the EMA).

The peers' adapters. transfusion-pytorch reads the same prompts / answers as mmar's text-tokenizer ids and
the same 8x8 images as 16 patch tokens of 4 values (its own flow matching, the transformer being the
denoiser). autoregressive-diffusion-pytorch 0.4 models a sequence of continuous tokens with no text and no
condition input; it gets the digit as a first continuous token (a fixed code of 4 values, the digit's bits as
+-1) before the 16 patch tokens, and draws an image from that prompt; so it has image-to-text "n/a" and no
CFG (it has no unconditional branch). Judged the same way: text-to-image by mmar's SVC digit judge (10 images
per digit, CFG 3.0 where a system has it), the Fréchet distance of the judge-independent features against
the held-out digits (beside it, real training digits' distance at the same count: the noise band),
image-to-text (greedy) on the held-out digits, and sampling speed (images/s at batch 1 and batch 32, CFG as
in the accuracy row, each system's default sampler: mmar DDIM 50 with the KV cache, transfusion-pytorch its
16-point ODE, autoregressive-diffusion-pytorch its 32-step EDM sampler).

    pip install -e ".[bench]" && pip install --no-deps autoregressive-diffusion-pytorch==0.4.0
    python benchmarks/peers.py [--budget seconds|flops] [--seconds 240] [--flop_steps 750] [--match params]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # both peers' samplers open progress bars unconditionally
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ROOT, machine, update_readme_block, update_section  # noqa: E402

from mmar.datasets.digits import i2t_prompt, load_digit_split, t2i_prompt  # noqa: E402
from mmar.eval.digits import (classify, features, fit_classifier, fit_feature_extractor, frechet_distance,  # noqa: E402
                              parse_digit, answer_images)
from mmar.sequence import Image, Message, Text  # noqa: E402

NUM_IMAGE_TOKENS = 16  # tokens per digit image; set from the recipe's tokenizer by set_image_tokens
OWN = {"transfusion-pytorch": dict(lr=3e-4, weight_decay=0.0, warmup=0, clip=0.5, decay=False, ema="beta0.99"),
       "autoregressive-diffusion-pytorch": dict(lr=3e-4, weight_decay=0.0, warmup=0, clip=None, decay=False,
                                                ema="defaults")}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# -- the peers' models --------------------------------------------------------------------------------
def set_image_tokens(processor) -> int:
    """The peers' image length: the recipe's tokens per 8x8 digit (16 with 2x2 patches, 4 with 4x4)."""
    global NUM_IMAGE_TOKENS
    NUM_IMAGE_TOKENS = processor.modality_tokenizers["image"].num_tokens()
    return NUM_IMAGE_TOKENS


def build_transfusion(dim: int, depth: int, heads: int, ff_ratio: float, processor, prob_uncond: float):
    from loguru import logger
    from transfusion_pytorch import Transfusion

    logger.disable("transfusion_pytorch")  # one INFO line per sampled sequence otherwise
    # FeedForward's GEGLU width is int(dim * expansion * 2 / 3): the expansion that gives mmar's FFN ratio
    return Transfusion(
        num_text_tokens=len(processor.tokenizer), dim_latent=processor.modality_tokenizers["image"].token_dim,
        channel_first_latent=False, modality_default_shape=(NUM_IMAGE_TOKENS,), modality_num_dim=1,
        add_pos_emb=True, prob_uncond=prob_uncond,
        transformer=dict(dim=dim, depth=depth, heads=heads, dim_head=dim // heads, ff_expansion_factor=ff_ratio * 1.5))


def build_ard(dim: int, depth: int, heads: int, ff_ratio: float, head_width: int, head_depth: int, token_dim: int):
    from autoregressive_diffusion_pytorch import AutoregressiveDiffusion

    return AutoregressiveDiffusion(dim=dim, max_seq_len=NUM_IMAGE_TOKENS + 1, depth=depth, heads=heads,
                                   dim_head=dim // heads, mlp_depth=head_depth, mlp_width=head_width,
                                   dim_input=token_dim, decoder_kwargs=dict(ff_mult=ff_ratio))


def matched_width(build: Callable[[int], torch.nn.Module], target: int, step: int, lo: int, hi: int) -> int:
    """The width (a multiple of ``step`` in [lo, hi]) whose model's parameter count is nearest ``target``;
    parameters grow with width, so a bisection finds it in a few builds."""
    count = {}

    def params(w):
        if w not in count:
            count[w] = n_params(build(w))
        return count[w]

    a, b = lo // step, hi // step
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if params(mid * step) < target else (a, mid)
    return min((a * step, b * step), key=lambda w: abs(params(w) - target))


def digit_code(digits, token_dim: int = 4) -> torch.Tensor:
    """The autoregressive-diffusion-pytorch prompt: each digit as one continuous token of ``token_dim``
    values (the image tokens' size), its 4 bits as +-1, zeros after."""
    d = torch.as_tensor(digits).long()
    bits = ((d[:, None] >> torch.arange(4)) & 1).float() * 2 - 1
    return torch.cat([bits, bits.new_zeros(len(d), token_dim - 4)], dim=1)


# -- transfusion-pytorch's data ----------------------------------------------------------------------
def to_transfusion(sample: list[Message], processor, rng: random.Random) -> tuple[list, list[float]]:
    """One chat sample as transfusion's list of items, and the flow times of its images: text segments as
    mmar's token ids (loss on the assistant's only, like mmar), images as the same ``[16, 4]`` patch tokens.
    A prompt image is clean (time 1, no flow loss); answer images follow transfusion's default time draw."""
    items, times, answer_times = [], [], []
    answer_images = sum(isinstance(s, Image) for m in sample if m.role == "assistant" for s in m.content)
    current = rng.randrange(answer_images) if answer_images else 0
    t_now = rng.random()
    for msg in sample:
        train = msg.role == "assistant"
        for seg in msg.content:
            if isinstance(seg, Text):
                items.append((torch.tensor(processor.encode_text(seg.text)), 1.0 if train else 0.0))
                continue
            _, tokens = processor.encode_item(seg)
            times.append((0.5 if len(answer_times) < current else t_now) if train else 1.0)
            answer_times += [times[-1]] if train else []
            items.append((0, tokens, 1.0 if train else 0.0))
    return items, times


def transfusion_batch(samples, processor, rng):
    conv = [to_transfusion(s, processor, rng) for s in samples]
    m = max(len(t) for _, t in conv)
    return [items for items, _ in conv], torch.tensor([t + [0.0] * (m - len(t)) for _, t in conv])


def image_prefix(model) -> list[torch.Tensor]:
    """``[meta] 16 [som]``: what transfusion's training forward puts before every image; a list prompt to
    ``sample_many`` is taken as is, so an image inside it needs these (and its ``[eom]``) spelled out."""
    return [torch.tensor([model.meta_id]), model.char_tokenizer(str(NUM_IMAGE_TOKENS)),
            torch.tensor([model.som_ids[0]])]


# -- one system ---------------------------------------------------------------------------------------
@dataclass
class System:
    """A model with its recipe: how it takes a step, draws digits and (if it can) reads them."""
    name: str
    recipe: str
    model: torch.nn.Module
    loss: Callable[[list[int]], torch.Tensor]
    draw: Callable[[torch.nn.Module, list[int], int], list]  # (sampling model, digits, seed) -> images
    read: Callable[[torch.nn.Module, np.ndarray], list[str]] | None
    opt: dict
    groups: list = None
    ema: object = None
    flops_per_step: float = 0.0
    step: int = 0
    used_s: float = 0.0
    losses: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name if self.name == "mmar" else f"{self.name} ({self.recipe} recipe)"

    def sampler(self) -> torch.nn.Module:
        return self.ema.ema_model if self.ema is not None else self.model


def make_optimizer(system: System) -> torch.optim.Optimizer:
    o = system.opt
    if o["weight_decay"]:
        return torch.optim.AdamW(system.groups, lr=o["lr"], betas=(0.9, o["beta2"]))
    return torch.optim.Adam(system.model.parameters(), lr=o["lr"])


def make_ema(system: System):
    from ema_pytorch import EMA

    if system.opt.get("ema") == "beta0.99":  # transfusion-pytorch's create_ema()
        return system.model.create_ema()
    if system.opt.get("ema") == "defaults":  # autoregressive-diffusion-pytorch's ImageTrainer
        return EMA(system.model, forward_method_names=("sample",))
    return None


def lr_at(o: dict, step: int, frac: float) -> float:
    """Linear warm-up, then (with ``decay``) cosine decay to ``min_ratio`` of the peak over the budget."""
    warm = min(1.0, (step + 1) / o["warmup"]) if o["warmup"] else 1.0
    if not o["decay"]:
        return o["lr"] * warm
    return o["lr"] * warm * (o["min_ratio"] + (1 - o["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class Trainer:
    """Trains the systems in turns of ``slice_s`` seconds until each has spent its budget."""

    def __init__(self, systems: list[System], batches, budget: str, amount: float):
        self.systems, self.batches, self.budget, self.amount = systems, batches, budget, amount
        self.opts = {id(s): make_optimizer(s) for s in systems}
        for s in systems:
            s.ema = make_ema(s)

    def spent(self, s: System) -> float:
        return s.used_s if self.budget == "seconds" else s.step * s.flops_per_step

    def run(self, slice_s: float) -> None:
        while any(self.spent(s) < self.amount for s in self.systems):
            for s in self.systems:
                self.run_slice(s, slice_s)
            print("  ".join(f"{s.label}: {s.step} steps {s.used_s:.0f}s loss {np.mean(s.losses[-10:]):.3f}"
                            for s in self.systems), flush=True)

    def run_slice(self, s: System, slice_s: float) -> None:
        opt, end = self.opts[id(s)], s.used_s + slice_s
        s.model.train()
        while s.used_s < end and self.spent(s) < self.amount:
            idx = self.batches(s.step)
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(s.opt, s.step, self.spent(s) / self.amount)
            loss = s.loss(idx)
            loss.backward()
            if s.opt["clip"]:
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.opt["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s.ema is not None:
                s.ema.update()
            s.used_s += time.perf_counter() - t0
            s.step += 1
            s.losses.append(float(loss))


def count_flops(s: System, idx: list[int]) -> float:
    """FLOPs of one training step's forward and backward on the batch ``idx``."""
    from torch.utils.flop_counter import FlopCounterMode

    s.model.train()
    with FlopCounterMode(display=False) as fc:
        s.loss(idx).backward()
    s.model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


# -- building the systems ----------------------------------------------------------------------------
def mmar_recipe(targs) -> dict:
    return dict(lr=targs.learning_rate, weight_decay=targs.weight_decay, beta2=targs.adam_beta2,
                warmup=targs.warmup_steps, clip=targs.max_grad_norm, decay=True, min_ratio=targs.min_lr_ratio)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i: i + size]


def mmar_system(ctx: dict) -> System:
    from mmar.pipeline import MMARPipeline
    from mmar.training.data import Collator
    from mmar.training.trainer import param_groups

    model, processor, dataset, margs, targs = (ctx[k] for k in ("model", "processor", "dataset", "margs", "targs"))
    collator = Collator(processor, margs.cond_dropout_prob, seed=targs.seed)

    def pipe(m):
        p = MMARPipeline(m, processor)
        p.set_progress_bar_config(disable=True)
        return p

    def draw(m, digits, seed, batch=100):
        p, images = pipe(m), []
        for k, chunk in chunks(digits, batch):
            gens = [torch.Generator().manual_seed(seed * 100_003 + k + i) for i in range(len(chunk))]
            out = p([t2i_prompt(d, k + i) for i, d in enumerate(chunk)], generator=gens, mode="image", max_items=1,
                    guidance_scale=ctx["guidance"])
            images += [imgs[0] for imgs in out.images]
        return images

    return System("mmar", "mmar", model, lambda idx: model(**collator([(i, dataset[i]) for i in idx])).loss,
                  draw, lambda m, x: answer_images(pipe(m), x), mmar_recipe(targs),
                  groups=param_groups(model, targs.weight_decay))


def transfusion_system(ctx: dict, width: int, recipe: str) -> System:
    from mmar.training.trainer import param_groups

    processor, dataset, margs, targs, bb = (ctx[k] for k in ("processor", "dataset", "margs", "targs", "backbone"))
    torch.manual_seed(targs.seed)
    model = build_transfusion(width, bb["num_hidden_layers"], bb["num_attention_heads"], ctx["ff_ratio"], processor,
                              margs.cond_dropout_prob)
    tok, rng = processor.modality_tokenizers["image"], random.Random(targs.seed)

    def loss(idx):
        items, times = transfusion_batch([dataset[i] for i in idx], processor, rng)
        return model(items, times=times)

    def draw(m, digits, seed, batch=100):
        m.eval()
        torch.manual_seed(seed)
        images = []
        for k, chunk in chunks(digits, batch):
            prompts = [[torch.tensor(processor.encode_text(t2i_prompt(d, k + i)))] for i, d in enumerate(chunk)]
            out = m.sample_many(prompts, force_modality_at_start=(0, (NUM_IMAGE_TOKENS,)),
                                max_length=NUM_IMAGE_TOKENS - 1, modality_steps=16, cfg_scale=ctx["guidance"],
                                return_unprocessed_modalities=True, return_without_prompt=True)
            images += tok.decode(torch.stack([s[0].tensor for s in out]).clamp(-1, 1))
        return images

    def read(m, x):
        m.eval()
        answers = []
        for k, chunk in chunks(list(range(len(x))), 100):
            qs = [processor.encode_text(i2t_prompt(i)) for i in chunk]
            prompts = [[*image_prefix(m), (0, processor.encode_item(Image(x[i]))[1]),
                        torch.tensor([m.eom_ids[0], *q])] for i, q in zip(chunk, qs)]
            out = m.sample_many(prompts, max_length=3, text_temperature=0.0, return_unprocessed_modalities=True)
            for sample, q in zip(out, qs):
                seq = [t for t in sample[-1].tolist()[1 + len(q):] if t < m.num_text_tokens]  # after [eom] + question
                answers.append(processor.tokenizer.decode(seq, skip_special_tokens=True))
        return answers

    opt = mmar_recipe(targs) if recipe == "mmar" else OWN["transfusion-pytorch"]
    return System("transfusion-pytorch", recipe, model, loss, draw, read, opt,
                  groups=param_groups(model, targs.weight_decay))


def ard_system(ctx: dict, width: int, recipe: str) -> System:
    from mmar.training.trainer import param_groups

    processor, targs, bb, head = (ctx[k] for k in ("processor", "targs", "backbone", "head"))
    torch.manual_seed(targs.seed)
    tok = processor.modality_tokenizers["image"]
    model = build_ard(width, bb["num_hidden_layers"], bb["num_attention_heads"], ctx["ff_ratio"], head["width"],
                      head["depth"], tok.token_dim)
    x, y = load_digit_split("train")
    patches = torch.stack([processor.encode_item(Image(img))[1] for img in x])  # mmar's own [16, 4] tokens

    def loss(idx):
        rows = [i % len(y) for i in idx]  # the shared order, over the training digits
        return model(torch.cat([digit_code(y[rows], tok.token_dim)[:, None], patches[rows]], dim=1))

    def draw(m, digits, seed, batch=100):
        m.eval()
        torch.manual_seed(seed)
        images = []
        for _, chunk in chunks(digits, batch):
            out = m.sample(batch_size=len(chunk), prompt=digit_code(chunk, tok.token_dim)[:, None])
            images += tok.decode(out[:, 1:].clamp(-1, 1))
        return images

    opt = mmar_recipe(targs) if recipe == "mmar" else OWN["autoregressive-diffusion-pytorch"]
    return System("autoregressive-diffusion-pytorch", recipe, model, loss, draw, None, opt,
                  groups=param_groups(model, targs.weight_decay))


def peer_widths(ctx: dict, match: str) -> dict[str, int]:
    """Each peer's width: mmar's backbone width (``shape``) or the one nearest mmar's parameters (``params``)."""
    bb, head, tok = ctx["backbone"], ctx["head"], ctx["processor"].modality_tokenizers["image"]
    if match == "shape":
        return {"transfusion-pytorch": bb["hidden_size"], "autoregressive-diffusion-pytorch": bb["hidden_size"]}
    depth, heads, target = bb["num_hidden_layers"], bb["num_attention_heads"], ctx["params"]
    step = 2 * heads  # the width is a multiple of twice the heads: an even head dimension
    return {"transfusion-pytorch": matched_width(
                lambda w: build_transfusion(w, depth, heads, ctx["ff_ratio"], ctx["processor"], 0.1), target, step,
                step, 4 * bb["hidden_size"]),
            "autoregressive-diffusion-pytorch": matched_width(
                lambda w: build_ard(w, depth, heads, ctx["ff_ratio"], head["width"], head["depth"], tok.token_dim),
                target, step, step, 4 * bb["hidden_size"])}


# -- judging -----------------------------------------------------------------------------------------
def judge(s: System, ctx: dict, per_digit: int, speed_images: int) -> dict:
    """Accuracy, Fréchet distance and sampling speed of one trained system (from its EMA where it has one)."""
    m = s.sampler()
    digits = [d for d in range(10) for _ in range(per_digit)]
    images = s.draw(m, digits, ctx["seed"])
    xte, yte = load_digit_split("test")
    out = {"system": s.name, "recipe": s.recipe, "params": n_params(s.model), "steps": s.step,
           "train_seconds": s.used_s, "flops_per_step": s.flops_per_step,
           "samples_per_s": s.step * ctx["batch"] / s.used_s,
           "final_loss": float(np.mean(s.losses[-20:])) if s.losses else None, "ema": s.ema is not None,
           "text_to_image_accuracy": float(np.mean(classify(ctx["clf"], images) == np.array(digits))),
           "frechet_distance": frechet_distance(features(ctx["mlp"], images), features(ctx["mlp"], xte))}
    if s.read is not None:
        answers = s.read(m, xte)
        out["image_to_text_accuracy"] = float(np.mean([parse_digit(a) == t for a, t in zip(answers, yte)]))
    for batch in (1, 32):
        n = min(speed_images, 4) if batch == 1 else 32
        s.draw(m, [0] * batch, 1, batch)  # warm-up
        t0 = time.perf_counter()
        s.draw(m, [d % 10 for d in range(n)], 2, batch)
        out[f"images_per_s_batch{batch}"] = n / (time.perf_counter() - t0)
    return out


# -- the run -----------------------------------------------------------------------------------------
def setup(args) -> dict:
    from mmar.training.arguments import build_arguments, load_yaml
    from mmar.training.data import build_dataset
    from mmar.training.trainer import build_everything

    margs, dargs, targs = build_arguments(load_yaml(args.config), source=args.config)
    torch.manual_seed(targs.seed)
    dataset = build_dataset(dargs.dataset, "train", seed=targs.seed, pairs_per_image=dargs.pairs_per_image,
                            shift_prob=dargs.shift_prob, data_files=dargs.data_files)
    model, processor = build_everything(margs, dataset)
    set_image_tokens(processor)
    bb = margs.backbone
    head = dict(model.config.modalities["image"].head)
    return {"margs": margs, "targs": targs, "dataset": dataset, "model": model, "processor": processor,
            "backbone": bb, "head": head, "ff_ratio": bb["intermediate_size"] / bb["hidden_size"],
            "params": n_params(model), "seed": targs.seed, "batch": targs.batch_size, "guidance": args.guidance_scale}


def shared_order(n: int, batch: int, seed: int):
    """Batch ``step`` of epochs of a fixed shuffled order, the same for every system."""
    order, gen = [], torch.Generator().manual_seed(seed)

    def batches(step: int) -> list[int]:
        while len(order) < (step + 1) * batch:
            order.extend(torch.randperm(n, generator=gen).tolist())
        return order[step * batch: (step + 1) * batch]

    return batches


def build_systems(ctx: dict, args) -> list[System]:
    widths = peer_widths(ctx, args.match)
    ctx["widths"] = widths
    systems = [mmar_system(ctx)]
    for peer in args.peers:
        make, name = ((transfusion_system, "transfusion-pytorch") if peer == "transfusion"
                      else (ard_system, "autoregressive-diffusion-pytorch"))
        systems += [make(ctx, widths[name], recipe) for recipe in args.recipes]
    return systems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--budget", choices=["seconds", "flops"], default="seconds")
    ap.add_argument("--seconds", type=float, default=240.0, help="--budget seconds: training seconds of each system")
    ap.add_argument("--flop_steps", type=int, default=750, help="--budget flops: the FLOPs of this many mmar steps")
    ap.add_argument("--match", choices=["params", "shape"], default="params")
    ap.add_argument("--peers", nargs="+", choices=["transfusion", "ard"], default=["transfusion", "ard"])
    ap.add_argument("--recipes", nargs="+", choices=["mmar", "own"], default=["mmar", "own"])
    ap.add_argument("--slice", type=float, default=15.0, help="alternate the systems every this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--per_digit", type=int, default=10)
    ap.add_argument("--no_write", action="store_true", help="print, do not write BENCHMARKS.md / README / results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ctx = setup(args)
    systems = build_systems(ctx, args)
    batches = shared_order(len(ctx["dataset"]), ctx["batch"], ctx["seed"])
    for s in systems:
        s.flops_per_step = count_flops(s, batches(0))
    amount = args.seconds if args.budget == "seconds" else systems[0].flops_per_step * args.flop_steps
    load_before, wall0 = os.getloadavg(), time.time()
    Trainer(systems, batches, args.budget, amount).run(args.slice)
    load_after = os.getloadavg()
    ctx["clf"], _ = fit_classifier(ctx["seed"])
    ctx["mlp"] = fit_feature_extractor(ctx["seed"])
    real = frechet_distance(features(ctx["mlp"], load_digit_split("train")[0][: 10 * args.per_digit]),
                            features(ctx["mlp"], load_digit_split("test")[0]))
    rows = [judge(s, ctx, args.per_digit, 4) for s in systems]
    res = {"rows": rows, "budget": args.budget, "amount": amount, "match": args.match, "widths": ctx["widths"],
           "fd_real_train": real, "load": (load_before, load_after), "wall_s": time.time() - wall0,
           "versions": {p: pkg_version(p) for p in ("transfusion-pytorch", "autoregressive-diffusion-pytorch")},
           "command": command(args), "machine": machine()}
    text = report(res, ctx, args)
    print(text)
    if not args.no_write:
        update_section(f"peers-{args.budget}", text)
        update_readme_block(f"peers-{args.budget}", headline(res))
        os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
        with open(os.path.join(ROOT, "results", f"peers-{args.budget}.json"), "w") as f:
            json.dump(res, f, indent=2)


def command(args) -> str:
    budget = f"--seconds {args.seconds:g}" if args.budget == "seconds" else f"--flop_steps {args.flop_steps}"
    return (f"python benchmarks/peers.py --budget {args.budget} {budget} --match {args.match} --slice {args.slice:g} "
            f"--threads {args.threads}")


def fmt(x, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def report(res: dict, ctx: dict, args) -> str:
    (l1, l2), bb, rows = res["load"], ctx["backbone"], res["rows"]
    budget = (f"{args.seconds:g} s of training each" if args.budget == "seconds" else
              f"the training FLOPs of {args.flop_steps} mmar steps each ({res['amount'] / 1e12:.1f} TFLOP)")
    lines = [f"## Peers at {'matched parameters' if args.match == 'params' else 'the same backbone shape'}, "
             f"equal {'wall-clock' if args.budget == 'seconds' else 'training FLOPs'} (digits)", "",
             f"`{res['command']}` on {res['machine']}; transfusion-pytorch {res['versions']['transfusion-pytorch']}, "
             f"autoregressive-diffusion-pytorch {res['versions']['autoregressive-diffusion-pytorch']}. Load average "
             f"{l1[0]:.1f}/{l1[1]:.1f}/{l1[2]:.1f} before and {l2[0]:.1f}/{l2[1]:.1f}/{l2[2]:.1f} after (the systems "
             f"alternate every {args.slice:g} s, so load hits all alike). {budget}, batch {ctx['batch']}, the same "
             f"data order. mmar: {bb['num_hidden_layers']} layers of width {bb['hidden_size']}; the peers "
             f"{bb['num_hidden_layers']} layers, {bb['num_attention_heads']} heads, width "
             + ", ".join(f"{w} ({p})" for p, w in res["widths"].items())
             + (", chosen so that the parameter count is nearest mmar's." if args.match == "params" else "."),
             "", "| system | params | FLOPs / step | steps | samples/s (train) | text-to-image | FD (real: "
             f"{res['fd_real_train']:.2f}) | image-to-text | images/s, batch 1 | images/s, batch 32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ema = ", EMA" if r["ema"] else ""
        label = r["system"] if r["system"] == "mmar" else f"{r['system']} ({r['recipe']} recipe{ema})"
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['flops_per_step'] / 1e9:.1f} G | {r['steps']} | "
                     f"{r['samples_per_s']:.0f} | {r['text_to_image_accuracy']:.0%} | {r['frechet_distance']:.2f} | "
                     f"{fmt(r.get('image_to_text_accuracy'), '.1%')} | {r['images_per_s_batch1']:.2f} | "
                     f"{r['images_per_s_batch32']:.1f} |")
    lines += ["", "Recipes: mmar's is the config's (AdamW, weight decay, warm-up, cosine decay over the budget, "
              "clip, condition dropout); the peers' own: Adam lr 3e-4 (transfusion-pytorch: clip 0.5 and an EMA of "
              "beta 0.99 as in its MNIST example; autoregressive-diffusion-pytorch: its ImageTrainer's EMA "
              f"defaults), sampled from the EMA. Text-to-image: {args.per_digit} images per digit, CFG "
              f"{args.guidance_scale:g} where a system has it (autoregressive-diffusion-pytorch has no unconditional "
              "branch: no CFG, and no text, so no image-to-text), mmar's SVC judge; FD: judge-independent features "
              "against the held-out digits (real training digits at the same count give the distance in the header, "
              "the noise floor); image-to-text: greedy on the 360 held-out digits. Sampling: each system's default "
              "sampler (mmar DDIM 50 with the KV cache; transfusion-pytorch a 16-point ODE of the whole transformer; "
              "autoregressive-diffusion-pytorch its 32-step EDM sampler), CFG as in the accuracy column.",
              "", headline(res)]
    return "\n".join(lines)


def headline(res: dict) -> str:
    """One sentence: mmar against the best peer row on text-to-image accuracy and batch-32 sampling speed."""
    rows = res["rows"]
    ours, peers = rows[0], rows[1:]
    if not peers:
        return "No peer was run."
    best = max(peers, key=lambda r: (r["text_to_image_accuracy"], -r["frechet_distance"]))
    fastest = max(peers, key=lambda r: r["images_per_s_batch32"])
    budget = "wall-clock" if res["budget"] == "seconds" else "training FLOPs"
    return (f"At matched parameters and equal {budget} (`{res['command']}`, {res['machine'].split(', ')[-1]}): "
            f"mmar {ours['text_to_image_accuracy']:.0%} text-to-image (FD {ours['frechet_distance']:.2f}), "
            f"the best peer row {best['system']} ({best['recipe']} recipe) {best['text_to_image_accuracy']:.0%} "
            f"(FD {best['frechet_distance']:.2f}); sampling at batch 32 mmar {ours['images_per_s_batch32']:.1f} "
            f"images/s, the fastest peer row {fastest['system']} {fastest['images_per_s_batch32']:.1f} "
            f"({ours['images_per_s_batch32'] / fastest['images_per_s_batch32']:.2f}x).")


if __name__ == "__main__":
    main()
