"""Images of several sizes (issue 17): train ``configs/digits-sizes.yaml`` (digits padded to 8x8, 8x12 and
12x8) from scratch, or take a trained ``--model``, run ``mmar eval --task digits-sizes`` and write the
"image-sizes" section of BENCHMARKS.md plus ``results/digits-sizes.json``.

Per size: the share of generated images that come out at the requested size, the judge's text-to-image
accuracy on their centred 8x8 crop, the padding's mean brightness and image-to-text accuracy. The target:
every non-square size within 5 points of the square one. With ``n`` images per size a difference of two
accuracies has a binomial standard error of ``sqrt(p1 q1 / n + p2 q2 / n)``; the table prints it beside the
gap so that a reader can tell a real gap from sampling noise.

    python benchmarks/image_sizes.py [--config configs/digits-sizes.yaml] [--output_dir runs/bench-digits-sizes]
                                     [--model DIR] [--per_digit 50]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from report import machine, update_readme_block, update_section  # noqa: E402

TARGET_POINTS = 5.0


def gaps(per_size: dict, n: int) -> list[tuple[str, float, float]]:
    """(size, accuracy difference to the square size in points, its standard error in points) per
    non-square size; positive = below the square size."""
    square = next(k for k in per_size if k.split("x")[0] == k.split("x")[1])
    p1 = per_size[square]["text_to_image_accuracy"]
    out = []
    for k, m in per_size.items():
        if k == square:
            continue
        p2 = m["text_to_image_accuracy"]
        se = math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
        out.append((k, 100 * (p1 - p2), 100 * se))
    return out


def section(m: dict, cmd: str, train_s: float | None) -> list[str]:
    n = 10 * m["per_digit"]
    rows = gaps(m["sizes"], n)
    worst = max(abs(g) for _, g, _ in rows)
    lines = ["## Images of several sizes (digits 8x8, 8x12, 12x8)", "",
             f"`{cmd}` on {machine()}."
             + (f" Training wall time {train_s / 60:.1f} min (shared box);" if train_s else "")
             + f" evaluation {m['eval_seconds']:.0f} s, {n} generated images per size (CFG {m['guidance_scale']}), "
             f"360 held-out digits per size for image-to-text; the judge (an RBF SVC on the 8x8 training split) "
             f"scores {m['classifier_heldout_accuracy']:.1%} on real held-out digits.", "",
             "| size (h x w) | requested size | text-to-image (judge) | padding brightness | image-to-text |",
             "|---|---|---|---|---|"]
    for k, s in m["sizes"].items():
        lines.append(f"| {k} | {s['requested_size_rate']:.0%} | {s['text_to_image_accuracy']:.1%} | "
                     f"{s['padding_mean_brightness']:.3f} | {s['image_to_text_accuracy']:.1%} |")
    lines += ["", "Text-to-image against the square size (points; + = below it), with the standard error of the "
              "difference: " + "; ".join(f"{k}: {g:+.1f} +- {se:.1f}" for k, g, se in rows) + ". "
              f"Target: within {TARGET_POINTS:.0f} points: **{'met' if worst <= TARGET_POINTS else 'missed'}** "
              f"(largest difference {worst:.1f} points)."]
    return lines


def headline(m: dict, cmd: str) -> str:
    """The README sentence: each size's judge accuracy and image-to-text, and the target's verdict."""
    rows = gaps(m["sizes"], 10 * m["per_digit"])
    worst = max(abs(g) for _, g, _ in rows)
    sizes = "; ".join(f"{k}: text-to-image {s['text_to_image_accuracy']:.1%}, image-to-text "
                      f"{s['image_to_text_accuracy']:.1%}" for k, s in m["sizes"].items())
    right = min(s["requested_size_rate"] for s in m["sizes"].values())
    sized = "every image at the requested size" if right == 1 else f"at least {right:.0%} at the requested size"
    return (f"Measured ({cmd}, {machine().split(', ')[-1]}): {sizes}; {sized}; the "
            f"largest text-to-image difference to the square size is {worst:.1f} points (target 5: "
            f"{'met' if worst <= TARGET_POINTS else 'missed'}; section \"Images of several sizes\" of "
            f"`BENCHMARKS.md`).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits-sizes.yaml")
    ap.add_argument("--output_dir", default="runs/bench-digits-sizes")
    ap.add_argument("--model", help="a trained model directory: evaluate it instead of training one")
    ap.add_argument("--per_digit", type=int, default=50, help="generated images per digit and size")
    ap.add_argument("--num_threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    args = ap.parse_args()

    from mmar.cli import main as cli
    from mmar.eval.digit_sizes import evaluate_digit_sizes

    train_s, model = None, args.model
    if model is None:
        t0 = time.time()
        threads = ["--num_threads", str(args.num_threads)] if args.num_threads else []
        cli(["train", "--config", args.config, "--output_dir", args.output_dir, "--progress", "false", *threads])
        train_s, model = time.time() - t0, args.output_dir
    m = evaluate_digit_sizes(model, output=os.path.join(model, "metrics.json"),
                             grid=os.path.join(model, "sizes_grid.png"), per_digit=args.per_digit)
    cmd = "python benchmarks/image_sizes.py" + (f" --model {args.model}" if args.model else
                                                f" --config {args.config}") + f" --per_digit {args.per_digit}"
    update_section("image-sizes", "\n".join(section(m, cmd, train_s)))
    update_readme_block("image-sizes", headline(m, f"`{cmd}`"))
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "digits-sizes.json"), "w") as f:
        json.dump({**m, "command": cmd, "model": os.path.basename(str(model).rstrip("/"))}, f, indent=2)
    print("\n".join(section(m, cmd, train_s)))


if __name__ == "__main__":
    main()
