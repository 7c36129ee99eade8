"""Scenes end to end: ``configs/scenes.yaml`` (trained if missing), ``mmar eval --task scenes``, against issue
14's targets.

    python benchmarks/scenes_quality.py [--config configs/scenes.yaml] [--model runs/scenes]

Reports text-to-image per GenEval category and overall on held-out prompts, the held-out-combination subset,
held-out wordings, image-to-text, editing per edit type, and FD with its noise band; the training time is the
run's own (its log). Writes the section "scenes-quality" of BENCHMARKS.md, README.md's ``scenes-quality``
block and ``results/scenes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from orthus_table import ensure_trained, scenes_rows  # noqa: E402
from report import ROOT, machine, update_readme_block, update_section  # noqa: E402

TARGETS = (("text-to-image overall (held-out prompts)", "text_to_image_overall", 0.85),
           ("position", None, 0.80), ("editing success", "editing_success", 0.85),
           ("image-to-text", "image_to_text_accuracy", 0.95))


def verdicts(m: dict) -> list[tuple[str, float, float]]:
    """(name, measured, target) for each of issue 14's targets."""
    out = []
    for name, key, target in TARGETS:
        value = m["text_to_image"]["by_category"]["position"] if key is None else m[key]
        out.append((name, value, target))
    return out


def headline(m: dict, args, secs: float) -> str:
    parts = [f"{name} {value:.1%} (target {target:.0%}, {'met' if value >= target else 'not met'})"
             for name, value, target in verdicts(m)]
    held = m["text_to_image"]["held_out_combinations"]["overall"]
    return (f"`python benchmarks/scenes_quality.py --config {args.config} --model {args.model}` "
            f"({time.strftime('%Y-%m-%d')}, trained {secs / 60:.0f} min on this 2-core CPU): " + "; ".join(parts)
            + f"; held-out combinations {held:.1%}; FD {m['frechet_distance']:.1f} (real training images "
            f"{m['frechet_distance_noise_band'][0]:.1f}-{m['frechet_distance_noise_band'][1]:.1f}). "
            "Editing per type and the categories: section \"Scenes\" of `BENCHMARKS.md`.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/scenes.yaml")
    ap.add_argument("--model", default="runs/scenes")
    ap.add_argument("--no_write", action="store_true")
    args = ap.parse_args()
    from mmar.eval import evaluate

    train_s = ensure_trained(args.config, args.model)
    log = [json.loads(line) for line in open(os.path.join(args.model, "log.jsonl"))]
    secs = train_s or log[-1]["elapsed_s"]
    start = time.time()
    m = evaluate("scenes", args.model, output=os.path.join(args.model, "metrics.json"))
    eval_s = time.time() - start
    edits = m["editing"]["by_type"]
    body = "\n".join([
        "## Scenes: text-to-image, image-to-text and editing (issue 14)", "",
        f"`python benchmarks/scenes_quality.py --config {args.config} --model {args.model}` on {machine()}; "
        f"{log[-1]['step']} training steps in {secs / 60:.1f} min (the run's log), evaluation {eval_s / 60:.1f} min.", "",
        *scenes_rows([("continuous + diffusion head (`" + args.config + "`)", m, secs)]), "",
        "Targets: " + "; ".join(f"{n} {v:.1%} against {t:.0%} ({'met' if v >= t else 'not met'})"
                                for n, v, t in verdicts(m)) + ".",
        "", "Editing success per edit type: " + ", ".join(
            f"{k} {v:.0%} ({m['editing']['n_by_type'][k]})" if v is not None else f"{k} n/a" for k, v in edits.items())
        + f"; the edit made {m['editing']['made']:.0%}, everything else kept {m['editing']['kept']:.0%}.",
        "", "Image-to-text per question type: " + ", ".join(
            f"{k} {v:.0%}" for k, v in m["image_to_text_by_question"].items() if v is not None) + ".", ""])
    print(body)
    if args.no_write:
        return
    update_section("scenes-quality", body)
    update_readme_block("scenes-quality", headline(m, args, secs))
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "scenes.json"), "w") as f:
        json.dump({**m, "train_seconds": secs, "eval_seconds": eval_s, "config": args.config, "machine": machine()},
                  f, indent=2, default=str)


if __name__ == "__main__":
    main()
