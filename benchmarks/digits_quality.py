"""Digits end to end: train ``configs/digits.yaml`` from scratch, evaluate, and compare with the ceilings.

Baselines, measured in the same run:
* image-to-text: an RBF SVC fitted on the same training split (a strong classical classifier);
* text-to-image: the same SVC on *real* held-out images (what perfect generation would score).

    python benchmarks/digits_quality.py [--config configs/digits.yaml] [--output_dir runs/bench-digits]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--output_dir", default="runs/bench-digits")
    ap.add_argument("--guidance_scale", type=float, default=3.0)
    args = ap.parse_args()

    from mmar.cli import main as cli
    from mmar.eval.digits import evaluate_digits, fit_classifier

    t0 = time.time()
    cli(["train", "--config", args.config, "--output_dir", args.output_dir, "--progress", "false"])
    train_s = time.time() - t0
    m = evaluate_digits(args.output_dir, output=os.path.join(args.output_dir, "metrics.json"),
                        guidance_scale=args.guidance_scale)
    _, svc = fit_classifier()
    rows = [
        ("image-to-text accuracy (held-out, 360)", m["image_to_text_accuracy"], "SVC on the same split", svc),
        ("text-to-image accuracy (100 images, CFG %.1f)" % args.guidance_scale, m["text_to_image_accuracy"],
         "SVC on real held-out images", svc),
        ("interleaved two-image accuracy (50 prompts)", m["interleaved_accuracy"], "SVC on real pairs", svc * svc),
    ]
    lines = [
        "## Digits: train from scratch, then `mmar eval`",
        "",
        f"`python benchmarks/digits_quality.py --config {args.config}` on {machine()}.",
        f"Training wall time: **{train_s / 60:.1f} min** ({train_s:.0f} s); evaluation {m['eval_seconds']} s.",
        "",
        "| metric | mmar | baseline | baseline value | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, ours, base, value in rows:
        lines.append(f"| {name} | {ours:.1%} | {base} | {value:.1%} | {ours / value:.3f} |")
    lines += ["", "Per-digit text-to-image accuracy: " +
              ", ".join(f"{d}: {v:.0%}" for d, v in m["text_to_image_per_digit"].items()) + "."]
    update_section("digits-quality", "\n".join(lines))
    print(json.dumps({**m, "train_seconds": round(train_s, 1)}, indent=2))


if __name__ == "__main__":
    main()
