"""Images per second end to end through the pipeline, beside the quality of those images (digits).

For each setting: images/s at batch 1 and at batch 32 (CFG on, ``--guidance_scale``), the digits judge's
text-to-image accuracy and the Fréchet distance (``mmar.eval.digits``) of ``--per_digit`` x 10 images drawn
at batch 32 (same prompts and seeds for every setting), beside the FD noise band: the spread of FD over
random subsets of real training digits of the same size. Settings: the diffusion model's default (DDIM 50),
DDIM 10, the few-step head (``mmar distill-head``: 1 and, for a 2-step student, 2 evaluations), flow Euler 8
when a flow model is given, and with ``--compile`` the compiled static-cache sampler. Each timing is the best
of ``--repeat`` runs, the settings taken in turn (a shared machine: ratios within one run are what counts).

    python benchmarks/generation_speed.py --model runs/digits --fast runs/digits-fast [runs/digits-fast2] [--flow DIR]

Where ``--fast`` does not exist yet it is distilled first (``mmar distill-head`` with its defaults, timed).
Without a flow model, ``--flow_frozen STEPS --recipe CONFIG`` trains a flow head on the teacher's frozen
backbone (as ``flow_vs_diffusion.py --frozen`` does) for the flow row. A zero-cost head (zeros) gives the
ceiling of any head speed-up: the backbone step and the sampler alone.
A few-step student distilled with ``--embedded_guidance true`` runs no CFG copy (its row says so). With
``--peers ard transfusion``: the samplers of autoregressive-diffusion-pytorch 0.4 and transfusion-pytorch 0.20,
built as ``benchmarks/peers.py`` builds them at ``--recipe``'s matched parameters, timed in the same turns.
With ``--speculative LAYERS K``: continuous speculative decoding (a draft of the first LAYERS layers, K drafts
per target call) beside its reference, the same stochastic DDIM chain drawn by the target alone.
Writes the section "generation-speed" of BENCHMARKS.md and the headline block of README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_readme_block, update_section  # noqa: E402

BATCH = 32
CEILING = "zero-cost head (returns zeros: the ceiling of any head speed-up)"


def draw(pipe, digits: list[int], batch: int, guidance: float, steps: int | None, **extra) -> tuple[list, float]:
    """Images for ``digits`` (seed = index) in batches of ``batch``, and the seconds the pipeline took."""
    from mmar.datasets.digits import t2i_prompt

    images, secs = [], 0.0
    for k in range(0, len(digits), batch):
        chunk = digits[k:k + batch]
        gens = [torch.Generator().manual_seed(k + i) for i in range(len(chunk))]
        gens = torch.Generator().manual_seed(k) if "draft" in extra else gens  # speculative: one per call
        start = time.perf_counter()
        out = pipe([t2i_prompt(d, k + i) for i, d in enumerate(chunk)], mode="image", guidance_scale=guidance,
                   num_inference_steps=steps, generator=gens, max_items=1, **extra)
        secs += time.perf_counter() - start
        images += [imgs[0] for imgs in out.images]
    return images, secs


def load(path: str):
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensure_fast(model: str, fast: str, threads: int) -> float | None:
    """Distil ``fast`` from ``model`` with the CLI's defaults where it does not exist; the seconds taken."""
    if os.path.isdir(fast):
        return None
    from mmar.cli import main as cli

    start = time.perf_counter()
    if cli(["distill-head", "--model", model, "--output", fast, "--num_threads", str(threads), "--progress", "false"]):
        raise SystemExit(f"distilling {model} into {fast} failed")
    return time.perf_counter() - start


def frozen_flow(model: str, recipe: str, steps: int) -> str:
    """A flow head (Euler 8, the teacher head's width and depth) trained for ``steps`` steps on ``model``'s
    frozen backbone, as ``benchmarks/flow_vs_diffusion.py --frozen`` does, saved next to it (reused if there)."""
    from flow_vs_diffusion import frozen_conditions, train_head

    path = model.rstrip(os.sep) + "-frozen-flow"
    if os.path.isdir(path):
        return path
    pipe = load(model)
    teacher = pipe.model.config.modalities["image"].head
    spec = {"name": "flow", "width": teacher["width"], "depth": teacher["depth"],
            "diffusion_batch_mul": teacher.get("diffusion_batch_mul", 4), "num_inference_steps": 8}
    cond, goal = frozen_conditions(pipe, recipe)
    pipe.model.heads["image"], _ = train_head(spec, cond, goal, steps, rows=1536)
    pipe.model.config.modalities["image"].head = spec
    pipe.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def settings(args) -> list[tuple[str, str, int | None, dict]]:
    """(label, model directory, steps, extra pipeline arguments) of every row, the default first."""
    import json

    rows = [("diffusion, DDIM 50 (default)", args.model, 50, {}), ("diffusion, DDIM 10", args.model, 10, {})]
    for fast in args.fast:
        student = json.load(open(os.path.join(fast, "config.json")))["modalities"]["image"]["head"]
        embedded = ", guidance distilled in (no CFG copy)" if student.get("embedded_guidance") else ""
        rows += [(f"few-step head ({student['steps']}-step student `{fast}`{embedded}), {k} step{'s' if k > 1 else ''}",
                  fast, k, {}) for k in range(1, student["steps"] + 1)]
    if args.flow:
        rows.append(("flow, Euler 8", args.flow, 8, {}))
    rows.append((CEILING, args.model, 1, {}))
    if args.compile:
        rows.append((f"few-step head (`{args.fast[0]}`), 1 step, compiled static-cache sampler", args.fast[0], 1,
                     {"cache_implementation": "static", "compile": True}))
    if args.speculative:  # its reference: the same stochastic chain drawn by the target alone (k = 0)
        L, k = args.speculative
        rows += [("stochastic DDIM 50 (eta 1), target alone: speculative decoding's reference", args.model, 50,
                  {"draft": L, "num_draft_tokens": 0}),
                 (f"speculative decoding, draft = first {L} layers, {k} drafts per call, stochastic DDIM 50",
                  args.model, 50, {"draft": L, "num_draft_tokens": k})]
    for system in peer_systems(args):
        rows.append((f"{PEER} {system.name} {peer_version(system.name)} ({system.params / 1e6:.2f}M parameters, "
                     f"its own sampler{', CFG' if system.name == 'transfusion-pytorch' else ', no CFG'}; "
                     "untrained weights: sampling cost only)", None, None, {"peer": system}))
    return rows


PEER = "peer:"


def peer_version(name: str) -> str:
    from peers import pkg_version

    return pkg_version(name)


def peer_systems(args) -> list:
    """With ``--peers``: transfusion-pytorch and autoregressive-diffusion-pytorch built as
    ``benchmarks/peers.py`` builds them, at ``--recipe``'s parameters (its image tokens, its widths matched),
    to time their samplers (the cost of drawing does not depend on the weights)."""
    if not args.peers:
        return []
    import peers

    ns = argparse.Namespace(config=args.recipe, guidance_scale=args.guidance_scale, match="params",
                            peers=args.peers, recipes=["mmar"])
    ctx = peers.setup(ns)
    systems = peers.build_systems(ctx, ns)[1:]  # the first is mmar itself
    for system in systems:
        system.params = peers.n_params(system.model)
    return systems


def time_peer(system, digits: list[int], single: int) -> tuple[float, float]:
    """Seconds a peer takes to draw ``digits`` in batches of 32, and ``single`` images one at a time."""
    m = system.sampler()
    system.draw(m, [0], 0, 1)  # warm-up
    start = time.perf_counter()
    system.draw(m, digits, 1, BATCH)
    b32 = time.perf_counter() - start
    start = time.perf_counter()
    system.draw(m, digits[:single], 2, 1)
    return b32, time.perf_counter() - start


def measure(args, rows, digits, clf, mlp, real) -> dict:
    """Per row: quality of the batch-32 images, best batch-32 and batch-1 seconds over the repeats."""
    from mmar.eval.digits import classify, features, frechet_distance

    pipes, results = {}, {}
    for rep in range(args.repeat):
        for label, path, steps, extra in rows:
            if "peer" in extra:
                secs, secs1 = time_peer(extra["peer"], digits, args.single)
                r = results.setdefault(label, {"b32": secs, "b1": secs1, "peer": extra["peer"].name})
                r["b32"], r["b1"] = min(r["b32"], secs), min(r["b1"], secs1)
                print(label, {k: v for k, v in r.items()}, flush=True)
                continue
            pipe = pipes.setdefault(path, load(path))
            head = pipe.model.heads["image"]
            if label == CEILING:  # what a token costs without its head: the backbone step and the sampler
                head.sample = lambda cond, dim=head.token_dim, **kw: cond.new_zeros(cond.shape[0], dim)
            images, secs = draw(pipe, digits, BATCH, args.guidance_scale, steps, **extra)
            _, secs1 = draw(pipe, digits[:args.single], 1, args.guidance_scale, steps, **extra)
            if label == CEILING:
                del head.sample  # the class's own method again
            r = results.setdefault(label, {"steps": steps, "b32": secs, "b1": secs1})
            if rep == 0 and label != CEILING:
                r["acc"] = float(np.mean(classify(clf, images) == np.array(digits)))
                r["fd"] = frechet_distance(features(mlp, images), real)
            r["b32"], r["b1"] = min(r["b32"], secs), min(r["b1"], secs1)
            print(label, {k: round(v, 4) for k, v in r.items()}, flush=True)
    return results


def fd_band(mlp, real, n: int, draws: int = 8) -> tuple[float, float]:
    """Mean and spread of FD between random ``n``-image subsets of real training digits and the held-out ones."""
    from mmar.datasets.digits import load_digit_split
    from mmar.eval.digits import features, frechet_distance

    xtr = load_digit_split("train")[0]
    rng = np.random.default_rng(0)
    fds = [frechet_distance(features(mlp, xtr[rng.choice(len(xtr), n, replace=False)]), real) for _ in range(draws)]
    return float(np.mean(fds)), float(np.std(fds))


def table(results: dict, n: int, single: int, noise: float) -> tuple[list[str], dict]:
    """The markdown rows, and the few-step verdict against the default."""
    base = results["diffusion, DDIM 50 (default)"]
    lines = [f"| setting | images/s, batch 1 | images/s, batch {BATCH} | speed-up vs DDIM 50 (batch 1 / {BATCH}) | "
             "text-to-image acc. | FD | DDIM 50's quality or better? |", "|---|---|---|---|---|---|---|"]
    verdict = {}
    for label, r in results.items():
        s1, s32 = base["b1"] / r["b1"], base["b32"] / r["b32"]
        speed = f"| {label} | {single / r['b1']:.2f} | {n / r['b32']:.1f} | {s1:.1f}x / {s32:.1f}x |"
        if label == CEILING:
            lines.append(speed + " – (blank images) | – | – |")
            continue
        if label.startswith(PEER):
            lines.append(speed + " – (sampling cost only) | – | – |")
            continue
        equal = r["acc"] >= base["acc"] - 0.01 and r["fd"] <= base["fd"] + 2 * noise  # equal or better
        lines.append(speed + f" {r['acc']:.1%} | {r['fd']:.2f} | {'yes' if equal else 'no'} |")
        if label.startswith("few-step"):
            verdict[label] = (equal, s1, s32, r)
    return lines, verdict


def headline(verdict: dict, base: dict, noise: float, ceiling: dict, model: str) -> str:
    """The README sentence: the best equal-quality few-step setting against the 5x target, or the shortfall,
    and the ceiling (a zero-cost head) that bounds any head's speed-up."""
    equal = {k: v for k, v in verdict.items() if v[0]}
    bound = (f" A zero-cost head that keeps the CFG copy would give {base['b1'] / ceiling['b1']:.1f}x / "
             f"{base['b32'] / ceiling['b32']:.1f}x: what is left is the backbone step (two rows per image under CFG, "
             "one with the guidance distilled into the head) and the sampler.")
    if equal:
        label, (_, s1, s32, r) = max(equal.items(), key=lambda kv: min(kv[1][1], kv[1][2]))  # both batch sizes
        met = "meets" if min(s1, s32) >= 5 else "is short of"
        return (f"On `{model}`, the {label} draws digits {s1:.1f}x (batch 1) and {s32:.1f}x (batch {BATCH}) as fast "
                f"as the default DDIM 50 at equal quality (accuracy {r['acc']:.1%} vs {base['acc']:.1%}, "
                f"FD {r['fd']:.2f} vs {base['fd']:.2f}, noise band +-{2 * noise:.2f}); it {met} the 5x target." + bound)
    label, (_, s1, s32, r) = max(verdict.items(), key=lambda kv: kv[1][2])
    return (f"On `{model}`, the {label} is {s1:.1f}x (batch 1) / {s32:.1f}x (batch {BATCH}) as fast as DDIM 50 but "
            f"not at equal quality (accuracy {r['acc']:.1%} vs {base['acc']:.1%}, FD {r['fd']:.2f} vs "
            f"{base['fd']:.2f}, noise band +-{2 * noise:.2f}): the 5x target at equal quality is not met." + bound)


def peers_note(results: dict, verdict: dict, n32: int, n1: int) -> str:
    """The best equal-quality mmar setting's images/s against each peer's sampler, at both batch sizes."""
    peers = {label: r for label, r in results.items() if label.startswith(PEER)}
    equal = {k: v for k, v in verdict.items() if v[0]}
    if not peers or not equal:
        return ""
    label, (_, _, _, r) = max(equal.items(), key=lambda kv: min(kv[1][1], kv[1][2]))
    parts, ahead = [], True
    for peer in peers.values():
        b32, b1 = peer["b32"] / r["b32"], peer["b1"] / r["b1"]  # mmar's speed over the peer's
        ahead &= min(b32, b1) > 1
        parts.append(f"{peer['peer']} draws {n32 / peer['b32']:.1f} / {n1 / peer['b1']:.2f} images/s, mmar "
                     f"{b32:.1f}x / {b1:.1f}x that")
    return (f" Against the peers' samplers at matched parameters (batch {BATCH} / batch 1; mmar: the {label}): "
            f"{'; '.join(parts)}: mmar is " + ("ahead of both." if ahead else "not ahead of every peer at both batch sizes."))


def flow_note(args) -> str:
    """Where the flow row's model came from."""
    if args.flow_frozen:
        return (f" The flow row's head was trained for {args.flow_frozen} steps on the teacher's frozen backbone "
                "(no flow model of this recipe was at hand).")
    return "" if args.flow else " No flow-head model was at hand for this run (no flow row)."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/digits", help="diffusion-head model (the default DDIM 50)")
    ap.add_argument("--fast", nargs="+", default=["runs/digits-fast"],
                    help="its distilled few-step model(s) (the first is made if missing)")
    ap.add_argument("--flow", default=None, help="a flow-head model of the same recipe, if at hand")
    ap.add_argument("--flow_frozen", type=int, default=0, metavar="STEPS",
                    help="no flow model at hand: train a flow head for STEPS steps on --model's frozen backbone")
    ap.add_argument("--recipe", default="configs/digits.yaml", help="--model's training config (for --flow_frozen)")
    ap.add_argument("--compile", action="store_true", help="also the compiled static-cache sampler (slow to compile)")
    ap.add_argument("--speculative", type=int, nargs=2, default=None, metavar=("LAYERS", "K"),
                    help="also continuous speculative decoding: a draft of the first LAYERS layers, K drafts per call")
    ap.add_argument("--peers", nargs="*", choices=["transfusion", "ard"], default=[],
                    help="also time the samplers of these peers at --recipe's matched parameters (needs [bench])")
    ap.add_argument("--per_digit", type=int, default=10)
    ap.add_argument("--single", type=int, default=10, help="images drawn one at a time for the batch-1 rate")
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmar.datasets.digits import load_digit_split
    from mmar.eval.digits import features, fit_classifier, fit_feature_extractor

    distil_secs = ensure_fast(args.model, args.fast[0], args.threads)
    if args.flow_frozen and not args.flow:
        args.flow = frozen_flow(args.model, args.recipe, args.flow_frozen)
    clf, svc = fit_classifier()
    mlp = fit_feature_extractor()
    real = features(mlp, load_digit_split("test")[0])
    digits = [d for d in range(10) for _ in range(args.per_digit)]
    fd_mean, noise = fd_band(mlp, real, len(digits))
    results = measure(args, settings(args), digits, clf, mlp, real)
    lines, verdict = table(results, len(digits), args.single, noise)
    base = results["diffusion, DDIM 50 (default)"]
    head = headline(verdict, base, noise, results[CEILING], args.model)
    made = f" (distilled in this run: {distil_secs / 60:.1f} min)" if distil_secs else ""
    teacher = load(args.model).model
    size = (f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters, its head's own default "
            f"DDIM {teacher.config.modalities['image'].head.get('num_inference_steps')}")
    body = "\n".join([
        "## Generation speed: images per second at equal quality (digits)", "",
        f"`python benchmarks/generation_speed.py --model {args.model} --fast {' '.join(args.fast)}"
        + (f" --flow_frozen {args.flow_frozen} --recipe {args.recipe}" if args.flow_frozen else
           f" --flow {args.flow}" if args.flow else "") + (" --compile" if args.compile else "") + \
        (f" --speculative {args.speculative[0]} {args.speculative[1]}" if args.speculative else "") + \
        (f" --peers {' '.join(args.peers)}" if args.peers else "")
        + f"` on {machine()}. **The machine was shared with other jobs: absolute times are noisy; compare the "
        "ratios, measured within this one run** (best of " + f"{args.repeat}, settings taken in turn). Teacher "
        f"`{args.model}` ({size}), few-step heads {', '.join(f'`{d}`' for d in args.fast)}{made}. End to end through "
        f"`MMARPipeline`, CFG "
        f"{args.guidance_scale:g}; batch 1: {args.single} images one at a time; batch {BATCH}: the {len(digits)} "
        f"images ({args.per_digit} per digit) whose accuracy (the SVC judge, {svc:.1%} on real held-out digits) "
        f"and FD are shown. FD of random {len(digits)}-image subsets of real training digits: {fd_mean:.2f} +- "
        f"{noise:.2f}; *DDIM 50's quality or better* = accuracy at most 1 point below DDIM 50's and FD at most "
        f"2 x {noise:.2f} above it.",
        "", *lines, "", head + peers_note(results, verdict, len(digits), args.single) + flow_note(args), ""])
    print(body)
    if not args.no_write:
        update_section("generation-speed", body)
        update_readme_block("generation-speed", head + peers_note(results, verdict, len(digits), args.single) + f" (`benchmarks/generation_speed.py`, {time.strftime('%Y-%m-%d')}, on a shared CPU; "
                      "see the section \"Generation speed\" of `BENCHMARKS.md`.)")


if __name__ == "__main__":
    main()
