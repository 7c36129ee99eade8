"""Digits end to end: train ``configs/digits.yaml`` from scratch, evaluate, and compare with the ceilings.

Baselines, measured in the same run:
* image-to-text: an RBF SVC fitted on the same training split (a strong classical classifier);
* text-to-image: the same SVC on *real* held-out images (what perfect generation would score).

The machine's fp32 matmul speed is measured just before and just after training and written beside the
training time (this box has measured 120 to 363 GFLOP/s on different days).

    python benchmarks/digits_quality.py [--config configs/digits.yaml] [--output_dir runs/bench-digits]

Writes the section "digits-quality" of BENCHMARKS.md, README.md's ``digits-quality`` block (the results
table) and ``results/digits-quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ROOT, machine, matmul_gflops, update_readme_block, update_section  # noqa: E402

TARGETS = {"text_to_image_accuracy": 0.99, "image_to_text_accuracy": 0.98, "interleaved_accuracy": 0.96}
MINUTES = 3.0  # issue 13: the first run trains in at most 3 minutes on the 2-core box


def readme_table(m: dict, args, train_s: float, peaks: tuple[float, float], steps: int, params: float) -> str:
    """The README's results table: each metric, its target and the measured value, and the command."""
    def pct(key: str) -> str:
        return f"**{m[key]:.1%}**"

    n_t2i, n_i2t = m.get("n_generated", 100), m.get("n_heldout", 360)
    rows = [
        "| metric (held-out split) | target | measured |", "|---|---|---|",
        f"| text-to-image accuracy (CFG {args.guidance_scale:g}, {n_t2i} images) | >= 99% | {pct('text_to_image_accuracy')} |",
        f"| text-to-image, prompts in wordings no training sample uses | | {pct('text_to_image_accuracy_heldout_prompts')} |",
        f"| image-to-text accuracy ({n_i2t} held-out digits) | >= 98% | {pct('image_to_text_accuracy')} |",
        f"| interleaved \"a 3 and then a 4:\" (both images right, in order; 50 prompts) | >= 96% | "
        f"{pct('interleaved_accuracy')} |",
        f"| training wall time ({steps} steps) | <= {MINUTES:g} min | **{train_s / 60:.1f} min** ({train_s:.0f} s) |",
    ]
    names = {"text_to_image_accuracy": "text-to-image", "image_to_text_accuracy": "image-to-text",
             "interleaved_accuracy": "interleaved"}
    missed = [f"{names[k]} ({m[k]:.1%} against {v:.0%})" for k, v in TARGETS.items() if m[k] < v]
    if train_s > MINUTES * 60:
        missed.append(f"the training time ({train_s / 60:.1f} min against {MINUTES:g})")
    return "\n".join([
        f"`python benchmarks/digits_quality.py --config {args.config}` ({time.strftime('%Y-%m-%d')}; "
        f"{params:.2f}M parameters trained from scratch on {machine()}, fp32 matmul {peaks[0]:.0f} / "
        f"{peaks[1]:.0f} GFLOP/s just before / after training):", "", *rows, "",
        "Every target met." if not missed else "Not met: " + ", ".join(missed) + ".",
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--output_dir", default="runs/bench-digits")
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    ap.add_argument("--no_write", action="store_true")
    args = ap.parse_args()

    from mmar.cli import main as cli
    from mmar.eval.digits import evaluate_digits, fit_classifier

    before = matmul_gflops()
    t0 = time.time()
    if cli(["train", "--config", args.config, "--output_dir", args.output_dir, "--progress", "false",
            "--overwrite_output_dir", "true"]):
        raise SystemExit("training failed")
    train_s = time.time() - t0
    after = matmul_gflops()
    m = evaluate_digits(args.output_dir, output=os.path.join(args.output_dir, "metrics.json"),
                        guidance_scale=args.guidance_scale)
    _, svc = fit_classifier()
    steps = json.load(open(os.path.join(args.output_dir, "training_args.json"))).get("max_steps")
    from mmar.pipeline import MMARPipeline

    params = sum(p.numel() for p in MMARPipeline.from_pretrained(args.output_dir).model.parameters()) / 1e6
    rows = [
        ("image-to-text accuracy (held-out, 360)", m["image_to_text_accuracy"], "SVC on the same split", svc),
        ("text-to-image accuracy (100 images, CFG %.1f)" % args.guidance_scale, m["text_to_image_accuracy"],
         "SVC on real held-out images", svc),
        ("text-to-image, held-out wordings", m["text_to_image_accuracy_heldout_prompts"],
         "SVC on real held-out images", svc),
        ("interleaved two-image accuracy (50 prompts)", m["interleaved_accuracy"], "SVC on real pairs", svc * svc),
    ]
    lines = [
        "## Digits: train from scratch, then `mmar eval`",
        "",
        f"`python benchmarks/digits_quality.py --config {args.config}` on {machine()}; fp32 matmul {before:.0f} / "
        f"{after:.0f} GFLOP/s just before / after training.",
        f"Training wall time: **{train_s / 60:.1f} min** ({train_s:.0f} s, {steps} steps); evaluation "
        f"{m['eval_seconds']} s.",
        "",
        "| metric | mmar | baseline | baseline value | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, ours, base, value in rows:
        lines.append(f"| {name} | {ours:.1%} | {base} | {value:.1%} | {ours / value:.3f} |")
    lines += ["", "Per-digit text-to-image accuracy: " +
              ", ".join(f"{d}: {v:.0%}" for d, v in m["text_to_image_per_digit"].items()) + "."]
    result = {**m, "train_seconds": round(train_s, 1), "steps": steps, "params_m": round(params, 3),
              "matmul_gflops_before_after": [round(before, 1), round(after, 1)], "config": args.config,
              "machine": machine()}
    print(json.dumps(result, indent=2))
    if args.no_write:
        return
    update_section("digits-quality", "\n".join(lines))
    update_readme_block("digits-quality", readme_table(m, args, train_s, (before, after), steps, params))
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "digits-quality.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
