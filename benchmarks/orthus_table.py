"""The miniature Orthus / MMAR table: continuous tokens + diffusion head against VQ tokens + codebook
head, same backbone, data, training steps and sampling settings, on digits, shapes and scenes.

Trains whatever is missing (``configs/digits-2x2.yaml`` / ``configs/digits-vq.yaml`` after
``configs/vq-digits.yaml``; ``configs/shapes.yaml`` / ``configs/shapes-vq.yaml`` after
``configs/vq-shapes.yaml``; ``configs/scenes.yaml`` / ``configs/scenes-vq.yaml`` after
``configs/vq-scenes.yaml``), evaluates each model with ``mmar eval`` and writes the table into
BENCHMARKS.md.

    python benchmarks/orthus_table.py [--tasks digits shapes scenes] [--runs runs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402

# task -> (continuous config, its run, discrete config, its run, VQ tokenizer config, its dir)
SETUPS = {
    "digits": ("configs/digits-2x2.yaml", "digits-2x2", "configs/digits-vq.yaml", "digits-vq",
               "configs/vq-digits.yaml", "vq-digits"),
    "shapes": ("configs/shapes.yaml", "shapes", "configs/shapes-vq.yaml", "shapes-vq",
               "configs/vq-shapes.yaml", "vq-shapes"),
    "scenes": ("configs/scenes.yaml", "scenes", "configs/scenes-vq.yaml", "scenes-vq",
               "configs/vq-scenes.yaml", "vq-scenes"),
}
DESCRIPTION = {
    "digits": "8x8 grey digits as 16 tokens of 2x2 patches; backbone hidden 192 x 4 layers, 1,600 steps of batch 64",
    "shapes": "16x16 RGB shapes as 16 tokens of 4x4 patches; backbone hidden 192 x 4 layers, 1,800 steps of batch 64",
    "scenes": "32x32 RGB scenes of 1-4 objects as 64 tokens of 4x4 patches; backbone hidden 256 x 6 layers, "
              "3,000 steps of batch 32",
}


def ensure_trained(config: str, out: str) -> float | None:
    from mmar.cli import main as cli

    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return None
    start = time.time()
    assert cli(["train", "--config", config, "--output_dir", out, "--progress", "false"]) == 0
    return time.time() - start


def run_task(task: str, runs: str) -> list[str]:
    from mmar.cli import main as cli
    from mmar.eval import evaluate

    cont_cfg, cont_run, disc_cfg, disc_run, vq_cfg, vq_run = SETUPS[task]
    vq_dir = os.path.join(runs, vq_run)
    if not os.path.isfile(os.path.join(vq_dir, "codebook.safetensors")):
        assert cli(["train-tokenizer", "--config", vq_cfg, "--output_dir", vq_dir]) == 0
    recon = json.load(open(os.path.join(vq_dir, "reconstruction.json")))
    rows = []
    for name, config, out in (("continuous + diffusion head (MMAR / Orthus)", cont_cfg, os.path.join(runs, cont_run)),
                              ("VQ-256 + codebook head (Janus / LlamaGen)", disc_cfg, os.path.join(runs, disc_run))):
        train_s = ensure_trained(config, out)
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        m = evaluate(task, out, output=os.path.join(out, "metrics.json"))
        rows.append((name, m, train_s or log[-1]["elapsed_s"]))
    lines = [f"### {task}", "",
             f"{DESCRIPTION[task]}; sampling settings from each model's generation config (CFG "
             f"{rows[0][1]['guidance_scale']}). The VQ codebook reconstructs held-out images at "
             f"{recon['heldout']['psnr_db']:.1f} dB PSNR; the continuous patches are exact.", ""]
    if task == "scenes":
        return lines + scenes_rows(rows) + [""]
    if task == "digits":
        lines += ["| image tokens + head | text-to-image acc. | image-to-text acc. | interleaved acc. | FD (lower is better) | train time |",
                  "|---|---|---|---|---|---|"]
        for name, m, secs in rows:
            lines.append(f"| {name} | {m['text_to_image_accuracy']:.1%} | {m['image_to_text_accuracy']:.1%} | "
                         f"{m['interleaved_accuracy']:.0%} | {m['frechet_distance']:.2f} | {secs / 60:.1f} min |")
        lines += ["", f"Accuracies judged by an independent SVC ({rows[0][1]['classifier_heldout_accuracy']:.1%} on real "
                  f"held-out digits); FD between 100 generated and the 360 held-out digits in the 32-unit hidden layer "
                  f"of an MLP trained on the training split (real training digits: "
                  f"{rows[0][1]['frechet_distance_real_train']:.2f})."]
    else:
        lines += ["| image tokens + head | text-to-image overall (GenEval rule) | colour / shape / position / count | held-out wordings | image-to-text acc. | FD (lower is better) | train time |",
                  "|---|---|---|---|---|---|---|"]
        for name, m, secs in rows:
            t = m["text_to_image"]
            lines.append(f"| {name} | {m['text_to_image_overall']:.1%} | {t['colour']:.0%} / {t['shape']:.0%} / "
                         f"{t['position']:.0%} / {t['count']:.0%} | {m['text_to_image_overall_heldout_prompts']:.1%} | "
                         f"{m['image_to_text_accuracy']:.1%} | "
                         f"{m['frechet_distance']:.1f} | {secs / 60:.1f} min |")
        lines += ["", f"Text-to-image: {rows[0][1]['n_generated']} held-out captions, each image checked by classical "
                  f"image analysis (the analyser passes {rows[0][1]['analyser_on_real_heldout']:.1%} of the real held-out "
                  f"images); held-out wordings: the same captions in {len(rows[0][1]['heldout_prompts'])} wordings no "
                  f"training sample uses; image-to-text: every question of the 400 held-out scenes. FD between the generated and "
                  f"the held-out images in the 32-unit hidden layer of an MLP trained to name the training scenes "
                  f"(real training images: {rows[0][1]['frechet_distance_real_train']:.1f})."]
    return lines + [""]


def scenes_rows(rows: list) -> list[str]:
    """The scenes table: GenEval overall and categories, the held-out-combination subset, image-to-text,
    editing and FD with its noise band, one row per model."""
    lines = ["| image tokens + head | text-to-image overall | single / two / count / colours / position / attribution "
             "| held-out combinations (position) | held-out wordings | image-to-text | editing success | FD (real-train band) "
             "| train time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m, secs in rows:
        t = m["text_to_image"]
        cats = " / ".join(f"{t['by_category'][c]:.0%}" for c in ("single_object", "two_object", "counting", "colours",
                                                                  "position", "colour_attribution"))
        held = t["held_out_combinations"]
        lo, hi = m["frechet_distance_noise_band"]
        lines.append(f"| {name} | {m['text_to_image_overall']:.1%} | {cats} | {held['overall']:.1%} "
                     f"({held['by_category']['position']:.0%}) | {m['text_to_image_overall_heldout_prompts']:.1%} | "
                     f"{m['image_to_text_accuracy']:.1%} | "
                     f"{m['editing_success']:.1%} | {m['frechet_distance']:.1f} ({lo:.1f}-{hi:.1f}) | {secs / 60:.1f} min |")
    m = rows[0][1]
    return lines + ["", f"Text-to-image: {m['n_generated']} held-out prompts over GenEval's six categories (overall: "
                    f"their mean) and {m['n_generated_held_out_extra']} more from scenes holding a held-out combination; "
                    f"held-out wordings: the first {m['n_generated_heldout_prompts']} of those prompts in "
                    f"{len(m['heldout_prompts'])} wordings no training sample uses; "
                    f"images read by classical image analysis (exact scene graph of "
                    f"{m['analyser_on_real_heldout']['scenes']:.1%} of the real held-out scenes); image-to-text: "
                    f"{m['n_questions']} questions; editing: {m['n_edits']} held-out edits, each right only when the "
                    "whole edited scene graph is read back. FD in the principal components of training pixels; the band "
                    "is real training images against the same held-out ones."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--runs", default="runs", help="where the models are (trained there when missing)")
    args = ap.parse_args()
    for task in args.tasks:  # one section per task, so a task can be rerun alone
        lines = [f"## Miniature Orthus / MMAR table ({task})", "",
                 f"`python benchmarks/orthus_table.py --tasks {task}` on {machine()}. The same backbone, data, "
                 "training steps and sampling settings; the only difference is how image tokens go in and come out.",
                 ""] + run_task(task, args.runs)[2:]
        update_section(f"orthus-{task}", "\n".join(lines).rstrip())
        print("\n".join(lines))


if __name__ == "__main__":
    main()
