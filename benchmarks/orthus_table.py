"""The miniature Orthus / MMAR table: continuous tokens + diffusion head against VQ tokens + codebook
head, same backbone, data and training steps, on digits.

Trains (unless the directories already hold trained models) ``configs/digits.yaml`` and
``configs/digits-vq.yaml`` (after ``mmar train-tokenizer --config configs/vq-digits.yaml``), evaluates
both with ``mmar eval`` and writes the table into BENCHMARKS.md.

    python benchmarks/orthus_table.py [--continuous runs/bench-digits] [--discrete runs/digits-vq]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402


def ensure_trained(config: str, out: str) -> float | None:
    from mmar.cli import main as cli

    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return None
    start = time.time()
    assert cli(["train", "--config", config, "--output_dir", out, "--progress", "false"]) == 0
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--continuous", default="runs/bench-digits")
    ap.add_argument("--discrete", default="runs/digits-vq")
    ap.add_argument("--vq", default="runs/vq-digits")
    args = ap.parse_args()
    from mmar.cli import main as cli
    from mmar.eval.digits import evaluate_digits

    if not os.path.isfile(os.path.join(args.vq, "codebook.safetensors")):
        assert cli(["train-tokenizer", "--config", "configs/vq-digits.yaml", "--output_dir", args.vq]) == 0
    recon = json.load(open(os.path.join(args.vq, "reconstruction.json")))
    rows = []
    for name, config, out in (("continuous + diffusion head (MMAR / Orthus)", "configs/digits.yaml", args.continuous),
                              ("VQ-256 + codebook head (Janus / LlamaGen)", "configs/digits-vq.yaml", args.discrete)):
        train_s = ensure_trained(config, out)
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        m = evaluate_digits(out, output=os.path.join(out, "metrics.json"), guidance_scale=3.0)
        rows.append((name, m, train_s or log[-1]["elapsed_s"]))
    lines = [
        "## Miniature Orthus / MMAR table (digits)",
        "",
        f"`python benchmarks/orthus_table.py` on {machine()}. Same Llama backbone (hidden 192, 4 layers), data, "
        "1,600 steps of batch 64, CFG 3.0; the only difference is how image tokens go in and come out. "
        f"The VQ codebook (256 codes over the same 2x2 patches) reconstructs held-out digits at "
        f"{recon['heldout']['psnr_db']:.1f} dB PSNR; the continuous patches are exact.",
        "",
        "| image tokens + head | text-to-image acc. | image-to-text acc. | interleaved acc. | FD (lower is better) | train time |",
        "|---|---|---|---|---|---|",
    ]
    for name, m, secs in rows:
        lines.append(f"| {name} | {m['text_to_image_accuracy']:.1%} | {m['image_to_text_accuracy']:.1%} | "
                     f"{m['interleaved_accuracy']:.0%} | {m['frechet_distance']:.2f} | {secs / 60:.1f} min |")
    lines += ["", f"FD: Fréchet distance between 100 generated and the 360 held-out digits in the 32-unit hidden "
              f"layer of an MLP trained on the training split; real training digits score "
              f"{rows[0][1]['frechet_distance_real_train']:.2f}. Accuracies are judged by an independent SVC "
              f"({rows[0][1]['classifier_heldout_accuracy']:.1%} on real held-out digits)."]
    update_section("orthus-table", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
