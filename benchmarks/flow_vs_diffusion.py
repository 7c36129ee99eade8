"""Flow-matching head against the diffusion head: quality against sampling steps and time on digits.

Two models trained with the same recipe, only the image head differs: ``configs/digits-2x2.yaml`` (diffusion
head, v-prediction, DDIM) and ``configs/digits-flow.yaml`` (rectified flow, Euler). Diffusion is sampled
with DDIM 10 / 25 / 50 steps, flow with 4 / 8 / 16 Euler steps; for each: text-to-image accuracy (the SVC
judge), Fréchet distance to the held-out digits (MLP features, as in ``mmar eval``) and the time to draw
the images (best of ``--repeat`` runs). Same prompts, seeds and CFG for all.

    python benchmarks/flow_vs_diffusion.py [--diffusion runs/bench-digits] [--flow runs/digits-flow]

Where training a second full model is too slow, ``--frozen DIR`` compares the heads on one frozen
backbone instead: the backbone's conditions for every image token of one epoch of the training data are
computed once, then a fresh diffusion head and a fresh flow head (each with its config's settings) are
trained on exactly those (condition, token) pairs for ``--head_steps`` steps, and sampled inside the same
model. Only the head differs; the backbone was trained with a diffusion head, which favours that head if
anything.

    python benchmarks/flow_vs_diffusion.py --frozen runs/bench-digits [--head_steps 1600]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402


def draw(pipe, digits: list[int], steps: int, guidance: float, batch: int = 100) -> tuple[list, float]:
    from mmar.datasets.digits import t2i_prompt

    images, secs = [], 0.0
    for k in range(0, len(digits), batch):
        chunk = digits[k: k + batch]
        gens = [torch.Generator().manual_seed(k + i) for i in range(len(chunk))]
        start = time.perf_counter()
        out = pipe([t2i_prompt(d, k + i) for i, d in enumerate(chunk)], mode="image", guidance_scale=guidance,
                   num_inference_steps=steps, generator=gens, max_items=1)
        secs += time.perf_counter() - start
        images += [imgs[0] for imgs in out.images]
    return images, secs


def head_spec(config: str) -> dict:
    from mmar.training.arguments import load_yaml

    return dict(load_yaml(config)["modalities"]["image"]["head"])


@torch.no_grad()
def frozen_conditions(pipe, config: str, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's hidden state before every trained image token of one epoch of the training data
    (condition dropout as in training), and the token: exactly what the head's loss sees in training."""
    from mmar.training.arguments import build_arguments, load_yaml
    from mmar.training.data import Collator, build_dataset

    margs, dargs, targs = build_arguments(load_yaml(config), source=config)
    ds = build_dataset(dargs.dataset, "train", seed=targs.seed, pairs_per_image=dargs.pairs_per_image,
                       shift_prob=dargs.shift_prob, data_files=dargs.data_files)
    collator = Collator(pipe.processor, margs.cond_dropout_prob, seed=targs.seed)
    model, ph = pipe.model, pipe.model.placeholder["image"]
    conds, goals = [], []
    for k in range(0, len(ds), batch):
        b = collator([(i, ds[i]) for i in range(k, min(k + batch, len(ds)))])
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], values=b["values"]).hidden_states
        labels, ids = b["labels"], b["input_ids"]
        conds.append(h[:, :-1][labels[:, 1:] == ph])
        goals.append(b["values"]["image"][(labels == ph)[ids == ph]])
    return torch.cat(conds), torch.cat(goals)


def train_head(spec: dict, cond: torch.Tensor, goal: torch.Tensor, steps: int, rows: int, lr: float = 1e-3,
               warmup: int = 100, seed: int = 0):
    """A fresh head trained on fixed (condition, token) pairs: AdamW, warm-up + cosine, like the recipe."""
    from mmar.heads import build_head
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    torch.manual_seed(seed)
    head = build_head(spec, cond_dim=cond.shape[1], token_dim=goal.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, cond.shape[0], (rows,), generator=gen)
        loss = head.loss(cond[idx], goal[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0:
            print(f"  {spec['name']} head: step {step + 1}, loss {loss.item():.4f}", flush=True)
    return head.eval(), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffusion", default="runs/bench-digits")
    ap.add_argument("--flow", default="runs/digits-flow")
    ap.add_argument("--per_digit", type=int, default=30)
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_write", action="store_true")
    ap.add_argument("--frozen", default=None, help="compare fresh heads on this model's frozen backbone")
    ap.add_argument("--diffusion_config", default="configs/digits-2x2.yaml")
    ap.add_argument("--flow_config", default="configs/digits-flow.yaml")
    ap.add_argument("--head_steps", type=int, default=1600)
    ap.add_argument("--head_rows", type=int, default=1536, help="image tokens per head step (about a batch of 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmar.datasets.digits import load_digit_split
    from mmar.eval.digits import classify, features, fit_classifier, fit_feature_extractor, frechet_distance
    from mmar.pipeline import MMARPipeline

    clf, svc = fit_classifier()
    mlp = fit_feature_extractor()
    xte = load_digit_split("test")[0]
    real = features(mlp, xte)
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    xtr = load_digit_split("train")[0]
    fd_real = frechet_distance(features(mlp, xtr[: len(digits)]), real)
    # how much FD moves between equally good image sets of this size: random subsets of real training digits
    rng = np.random.default_rng(0)
    fd_subsets = [frechet_distance(features(mlp, xtr[rng.choice(len(xtr), len(digits), replace=False)]), real)
                  for _ in range(8)]
    noise = float(np.std(fd_subsets))
    settings = [("diffusion", args.diffusion, "DDIM", s) for s in (10, 25, 50)] + \
               [("flow", args.flow, "Euler", s) for s in (4, 8, 16)]
    pipes, heads, head_train = {}, {}, {}
    if args.frozen:
        pipe = MMARPipeline.from_pretrained(args.frozen)
        pipe.set_progress_bar_config(disable=True)
        cond, goal = frozen_conditions(pipe, args.diffusion_config)
        print(f"{cond.shape[0]} (condition, token) pairs from the frozen backbone", flush=True)
        for head, config in (("diffusion", args.diffusion_config), ("flow", args.flow_config)):
            heads[head], head_train[head] = train_head(head_spec(config), cond, goal, args.head_steps,
                                                       args.head_rows)
            pipes[head] = pipe
    else:
        for head, path, _, _ in settings:
            if head not in pipes:
                pipes[head] = MMARPipeline.from_pretrained(path)
                pipes[head].set_progress_bar_config(disable=True)
                assert pipes[head].model.config.modalities["image"]["head"]["name"] == head, path
    results = {}
    for rep in range(args.repeat):  # alternate the settings, keep each one's best time (a shared machine)
        for head, path, sampler, steps in settings:
            if heads:
                pipes[head].model.heads["image"] = heads[head]
            images, secs = draw(pipes[head], digits, steps, args.guidance_scale)
            prev = results.get((head, steps))
            if prev is None:
                results[(head, steps)] = {"acc": float(np.mean(classify(clf, images) == np.array(digits))),
                                          "fd": frechet_distance(features(mlp, images), real), "seconds": secs}
            else:
                prev["seconds"] = min(prev["seconds"], secs)
            print(head, sampler, steps, results[(head, steps)], flush=True)
    base = results[("diffusion", 50)]
    best_flow = min((r["fd"], s) for (h, s), r in results.items() if h == "flow")
    n = len(digits)
    if args.frozen:
        how = (f"`python benchmarks/flow_vs_diffusion.py --frozen {args.frozen} --head_steps {args.head_steps}` on "
               f"{machine()}. One frozen backbone ({args.frozen}); a fresh diffusion head (`{args.diffusion_config}`: "
               "v-prediction, cosine schedule, DDIM) and a fresh flow head (`" + args.flow_config + "`: rectified "
               f"flow, logit-normal t, Euler), the same width and depth, each trained for {args.head_steps} steps of "
               f"{args.head_rows} image tokens on the same {cond.shape[0]:,} (condition, token) pairs (one epoch of "
               "the training data through the backbone, condition dropout included; head training "
               + ", ".join(f"{h} {s:.0f} s" for h, s in head_train.items()) + "). Only the head differs. ")
    else:
        how = (f"`python benchmarks/flow_vs_diffusion.py --diffusion {args.diffusion} --flow {args.flow}` on "
               f"{machine()}. Two models trained with the same recipe (`configs/digits-2x2.yaml`, 1,600 steps of batch "
               "64), only the image head differs: diffusion (v-prediction, cosine schedule, DDIM) and flow "
               "(`configs/digits-flow.yaml`: rectified flow, logit-normal t, Euler). ")
    title = "## Flow-matching head against the diffusion head: quality against sampling steps (digits)"
    lines = [title + (", one frozen backbone" if args.frozen else ""), "",
             how +
             f"{n} images ({args.per_digit} per digit), CFG {args.guidance_scale:g}, batch 100; time: best of "
             f"{args.repeat}; baseline: the default DDIM 50. Real training digits score FD {fd_real:.2f} "
             f"against the held-out ones; the SVC judge is {svc:.1%} right on real held-out digits.", "",
             f"| head | sampler | text-to-image acc. | FD (lower is better) | time for {n} images | time vs DDIM 50 |",
             "|---|---|---|---|---|---|"]
    for (head, steps), r in results.items():
        sampler = "DDIM" if head == "diffusion" else "Euler"
        lines.append(f"| {head} | {sampler} {steps} | {r['acc']:.1%} | {r['fd']:.2f} | {r['seconds']:.1f} s | "
                     f"{r['seconds'] / base['seconds']:.2f}x |")
    fd_flow, steps_flow = best_flow
    fastest = results[("diffusion", 10)]
    flow_best = results[("flow", steps_flow)]
    margin = 2 * noise  # an FD difference smaller than this is not evidence
    beats_fast = [s for (h, s), r in results.items() if h == "flow" and r["seconds"] <= fastest["seconds"]
                  and r["fd"] < fastest["fd"] - margin and r["acc"] >= fastest["acc"] - 0.01]
    beats_best = [s for (h, s), r in results.items() if h == "flow" and r["seconds"] < base["seconds"]
                  and r["fd"] < min(r2["fd"] for (h2, _), r2 in results.items() if h2 == "diffusion") - margin]
    best_diffusion = min(r["fd"] for (h, _), r in results.items() if h == "diffusion")
    if beats_fast or beats_best:
        verdict = (f"**Flow wins**: Euler {min(beats_fast or beats_best)} is better than the diffusion head by more "
                   f"than the FD noise ({margin:.2f}) at less time.")
    elif abs(fd_flow - best_diffusion) <= margin:
        verdict = (f"**Level**: the best FDs differ by {abs(fd_flow - best_diffusion):.2f}, inside the noise "
                   f"(2 x {noise:.2f}, the spread of FD over random {n}-image subsets of real training digits); "
                   "no evidence to change the default head (diffusion).")
    else:
        verdict = ("**Flow does not win**: its best FD is worse than the diffusion head's by more than the noise "
                   f"({margin:.2f}); the diffusion head stays the default.")
    lines += ["", f"Best flow setting: Euler {steps_flow} (accuracy {flow_best['acc']:.1%}, FD {fd_flow:.2f}, "
              f"{flow_best['seconds']:.1f} s) against DDIM 50 ({base['acc']:.1%}, FD {base['fd']:.2f}, "
              f"{base['seconds']:.1f} s) and DDIM 10 ({fastest['acc']:.1%}, FD {fastest['fd']:.2f}, "
              f"{fastest['seconds']:.1f} s). FD of random {n}-image subsets of real training digits: "
              f"{np.mean(fd_subsets):.2f} +- {noise:.2f}. " + verdict]
    near = min((abs(r["seconds"] - fastest["seconds"]), s) for (h, s), r in results.items() if h == "flow")[1]
    r_near = results[("flow", near)]
    lines += [f"At about DDIM 10's time ({fastest['seconds']:.1f} s), flow Euler {near} ({r_near['seconds']:.1f} s) scores "
              f"FD {r_near['fd']:.2f} against {fastest['fd']:.2f}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_section("flow-vs-diffusion-frozen" if args.frozen else "flow-vs-diffusion", text)


if __name__ == "__main__":
    main()
