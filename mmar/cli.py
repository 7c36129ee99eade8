"""``mmar`` command line: train, eval, generate, env."""

from __future__ import annotations

import argparse
import json
import os
import sys

EXAMPLES = """examples:
  mmar train --config configs/digits.yaml
  mmar train --config configs/digits.yaml --max_steps 200 --output_dir runs/quick
  mmar eval --model runs/digits --task digits --output metrics.json
  mmar generate --model runs/digits --prompt "draw the digit seven" --mode image --output out/
  mmar env
"""


def cmd_train(ns: argparse.Namespace) -> int:
    from .training.arguments import parse_arguments
    from .training.trainer import train

    train(*parse_arguments(ns))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .eval import evaluate

    metrics = evaluate(ns.task, ns.model, output=ns.output, grid=ns.grid, guidance_scale=ns.guidance_scale,
                       num_inference_steps=ns.num_inference_steps, seed=ns.seed, per_digit=ns.per_digit)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    from .pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(ns.model)
    gens = [torch.Generator().manual_seed(ns.seed + i) for i in range(ns.num)]
    out = pipe([ns.prompt] * ns.num, images=[ns.image or []] * ns.num, mode=ns.mode, generator=gens,
               guidance_scale=ns.guidance_scale, temperature=ns.temperature, max_new_tokens=ns.max_new_tokens,
               num_inference_steps=ns.num_inference_steps)
    os.makedirs(ns.output, exist_ok=True)
    record = {"model": ns.model, "prompt": ns.prompt, "mode": ns.mode, "seed": ns.seed,
              "guidance_scale": ns.guidance_scale, "temperature": ns.temperature, "outputs": []}
    for i, row in enumerate(out.segments):
        files, k = [], 0
        for seg in row:
            if not isinstance(seg, str):
                path = os.path.join(ns.output, f"sample{i}_{k}.png")
                seg.save(path)
                files.append(path)
                k += 1
        record["outputs"].append({"text": out.text[i], "files": files})
        print(f"[{i}] {out.text[i]!r} {' '.join(files)}")
    with open(os.path.join(ns.output, "generation.json"), "w") as f:
        json.dump(record, f, indent=2)
    return 0


def cmd_env(ns: argparse.Namespace) -> int:
    import platform

    import torch

    print(f"python {platform.python_version()} on {platform.platform()}")
    for name in ("torch", "transformers", "diffusers", "accelerate", "peft", "tokenizers", "safetensors",
                 "xformers", "gradio", "sklearn"):
        try:
            mod = __import__(name)
            print(f"{name:13s} {getattr(mod, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - report any import failure as missing
            print(f"{name:13s} not available ({type(e).__name__})")
    print(f"cuda          {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print(f"cpu threads   {torch.get_num_threads()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .training.arguments import add_arguments

    parser = argparse.ArgumentParser(prog="mmar", description="unified multimodal autoregressive models",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or fine-tune a model", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on a built-in task", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--task", default="digits", choices=["digits"])
    p.add_argument("--output", help="write the metrics here as JSON")
    p.add_argument("--grid", help="write the generated images here as a PNG grid (default: next to --output)")
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--per_digit", type=int, default=10, help="generated images per digit")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text and images from a prompt", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", help="an input image (repeatable)")
    p.add_argument("--mode", default="auto", choices=["auto", "text", "image"])
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--output", default="outputs")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("env", help="print versions and devices")
    p.set_defaults(func=cmd_env)

    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmar {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
