"""``mmar`` command line: train, eval, generate, chat, demo, distill-head, env."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..types import Image, segment_class, segment_modalities
from .chat import COMMANDS as COMMANDS_HELP

EXAMPLES = """examples:
  mmar train --config configs/digits.yaml
  mmar train --config configs/digits.yaml --max_steps 200 --output_dir runs/quick
  mmar train --config configs/finetune-lora.yaml --data_files my_chats.jsonl
  mmar train --config configs/finetune-lora.yaml --data_files my_chats.jsonl --eval_split 0.1 \
             --load_best_model_at_end true --early_stopping_patience 3
  mmar merge-lora --adapter runs/lora --output runs/merged
  mmar distill-head --model runs/digits --output runs/digits-fast
  mmar eval --model runs/digits --task digits --output metrics.json
  mmar eval --model runs/lora --task jsonl --data_files held_out.jsonl
  mmar generate --model runs/digits --prompt "draw the digit seven" --mode image --output out/
  mmar chat --model runs/digits --image digit.png
  mmar demo --model runs/digits --port 7860
  mmar env
"""
GENERATE_EXAMPLES = """examples:
  mmar generate --model runs/digits --prompt "draw the digit seven" --mode image --num 4 --output out/
  mmar generate --model runs/digits --prompt "which digit is this?" --image digit.png --mode text --temperature 0
  mmar generate --model runs/digits --prompt "a 3 and then a 4:" --guidance_scale 3
  mmar generate --model runs/scenes --image in.png --prompt "make the circle blue" --mode image \
      --guidance_scale 4 --image_guidance_scale 1.5

Images go to OUTPUT/sample<i>_<k>.png, and OUTPUT/generation.json records the prompt, settings and outputs.
"""
CHAT_EXAMPLES = """examples:
  mmar chat --model runs/digits
  mmar chat --model runs/digits --image digit.png --temperature 0
  echo "draw the digit seven" | mmar chat --model runs/digits --output_dir out/chat

Type a message and press Enter; the reply streams in. Images the model draws are saved under
--output_dir and their paths printed.

""" + COMMANDS_HELP
DEMO_EXAMPLES = """examples:
  mmar demo --model runs/digits                      # http://127.0.0.1:7860
  mmar demo --model runs/digits --port 8080 --max_new_tokens 32
  mmar demo --model runs/digits --host 0.0.0.0 --auth me:secret   # reachable from other machines: log in

The demo has a Chat tab (upload images, streamed replies), a Generate tab (prompt, guidance scale,
steps, seed, number of images), an Edit tab (upload an image, instruct, get the edited image) and the
model's details. Needs the demo extra: pip install "mmar[demo]".
"""


def cmd_train(ns: argparse.Namespace) -> int:
    from ..training.arguments import parse_arguments
    from ..training.trainer import train

    train(*parse_arguments(ns))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from ..eval import evaluate

    sizes = {k: getattr(ns, k) for k in ("per_digit", "num_prompts", "num_qa_scenes", "num_edits", "data_files",
                                         "max_samples", "image_guidance_scale") if getattr(ns, k) is not None}
    metrics = evaluate(ns.task, ns.model, output=ns.output, grid=ns.grid, guidance_scale=ns.guidance_scale,
                       image_temperature=ns.image_temperature, num_inference_steps=ns.num_inference_steps,
                       seed=ns.seed, **sizes)
    print(json.dumps(metrics, indent=2))
    return 0


_RECORD_KEY = {Image.modality: "images"}  # generation.json's key for a modality's inputs, where it is not its name


def _modes() -> list[str]:
    """``--mode`` choices: auto, text, or open an item of a modality at once (the model says which it has)."""
    return ["auto", "text", *segment_modalities()]


def _add_media_arguments(p: argparse.ArgumentParser, help_text: str) -> None:
    """One repeatable ``--<modality> PATH`` per modality mmar knows; the model says which it takes."""
    for m in segment_modalities():
        p.add_argument(f"--{m}", dest=m, action="append", metavar="PATH",
                       help=help_text.format(segment_class(m).noun or m))


def _media_paths(ns: argparse.Namespace) -> dict[str, list[str]]:
    return {m: getattr(ns, m) for m in segment_modalities() if getattr(ns, m, None)}


def cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    from ..io import save_output
    from ..pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(ns.model)
    paths = _media_paths(ns)
    items = {m: [pipe.load(m, path) for path in ps] for m, ps in paths.items()}  # clear error naming a bad file
    gens = [torch.Generator().manual_seed(ns.seed + i) for i in range(ns.num)]
    settings = {k: getattr(ns, k) for k in ("guidance_scale", "image_guidance_scale", "temperature", "max_new_tokens",
                                            "num_inference_steps")}
    out = pipe([ns.prompt] * ns.num, media={m: [x] * ns.num for m, x in items.items()}, mode=ns.mode,
               generator=gens, height=ns.height, width=ns.width, **settings)
    os.makedirs(ns.output, exist_ok=True)
    used = {k: getattr(pipe.generation_config, k) if v is None else v for k, v in settings.items()}
    inputs = {_RECORD_KEY.get(m, m): paths.get(m, []) for m in segment_modalities()}
    record = {"model": ns.model, "prompt": ns.prompt, **inputs, "mode": ns.mode, "seed": ns.seed,
              "height": ns.height, "width": ns.width,
              **used, "outputs": []}
    for i, row in enumerate(out.segments):
        files, k = [], 0
        for seg in row:
            if not isinstance(seg, str):  # an image (PNG) or an audio clip (WAV)
                files.append(save_output(seg, os.path.join(ns.output, f"sample{i}_{k}")))
                k += 1
        record["outputs"].append({"text": out.text[i], "files": files})
        print(f"[{i}] {out.text[i]!r} {' '.join(files)}")
    with open(os.path.join(ns.output, "generation.json"), "w") as f:
        json.dump(record, f, indent=2)
    return 0


def cmd_train_tokenizer(ns: argparse.Namespace) -> int:
    from ..training.arguments import load_yaml
    from ..training.tokenizer_trainer import train_tokenizer

    config = load_yaml(ns.config)
    if ns.output_dir:
        config["output_dir"] = ns.output_dir
    report = train_tokenizer(config)
    print(json.dumps({k: v for k, v in report.items() if k != "fit_history"}, indent=2))
    return 0


def cmd_merge_lora(ns: argparse.Namespace) -> int:
    from ..training.lora import merge_lora

    print(f"merged model written to {merge_lora(ns.adapter, ns.output, ns.base)}")
    return 0


def cmd_distill_head(ns: argparse.Namespace) -> int:
    from ..training.distill import DistillArguments, distill

    options = {k: getattr(ns, k) for k in ("steps", "teacher_steps", "guidance_scales", "pairs", "max_steps",
                                            "batch_size", "learning_rate", "modality", "dataset", "data_files",
                                            "max_samples", "seed", "embedded_guidance", "num_threads", "progress")}
    summary = distill(DistillArguments(model=ns.model, output=ns.output, **options))
    print(f"mmar: distilled {summary['modality']} head ({summary['teacher']['name']}, {ns.teacher_steps} steps) "
          f"into a {ns.steps}-step head: held-out loss {summary['val_loss_before']:.4g} -> "
          f"{summary['val_loss_after']:.4g}; model saved to {ns.output}")
    return 0


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def cmd_chat(ns: argparse.Namespace) -> int:
    from .chat import ChatSession
    from ..pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(ns.model)
    pipe.set_progress_bar_config(disable=True)
    session = ChatSession(pipe, ns.output_dir, seed=ns.seed, memory=ns.memory, mode=ns.mode,
                          temperature=ns.temperature, guidance_scale=ns.guidance_scale,
                          max_new_tokens=ns.max_new_tokens, num_inference_steps=ns.num_inference_steps)
    for modality, paths in _media_paths(ns).items():
        for path in paths:
            session.attach(modality, path)
    return session.run()


def _auth(s: str) -> tuple[str, str]:
    user, sep, password = s.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected user:password")
    return user, password


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(s: str) -> int:
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``kill``) ends the demo like Ctrl-C: exit handlers run, temp folders go."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def cmd_demo(ns: argparse.Namespace) -> int:
    from ..pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(ns.model)
    try:
        from .demo import build_demo, digits_examples, launch
    except ImportError as e:
        print(f"mmar demo: error: the demo needs gradio ({e}); install it with: pip install 'mmar[demo]'",
              file=sys.stderr)
        return 2
    chat_examples, prompt_examples = digits_examples() if ns.examples == "digits" else (None, None)
    demo = build_demo(pipe, max_new_tokens=ns.max_new_tokens, max_prompt_chars=ns.max_prompt_chars,
                      queue_size=ns.queue_size, chat_memory=ns.memory, chat_examples=chat_examples,
                      prompt_examples=prompt_examples, max_context_tokens=ns.max_context_tokens)
    _stop_on_sigterm()
    try:
        launch(demo, host=ns.host, port=ns.port, share=ns.share, auth=ns.auth)
    except OSError as e:
        print(f"mmar demo: error: cannot serve on {ns.host}:{ns.port} ({e}); pick another --port",
              file=sys.stderr)
        return 2
    return 0


def cmd_env(ns: argparse.Namespace) -> int:
    import platform

    import torch

    from .. import attention

    print(f"python {platform.python_version()} on {platform.platform()}")
    for name in ("torch", "transformers", "diffusers", "accelerate", "peft", "tokenizers", "safetensors",
                 "xformers", "bitsandbytes", "torchao", "deepspeed", "gradio", "sklearn"):
        print(f"{name:13s} {_package_version(name)}")
    print(f"cuda          {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print(f"cpu threads   {torch.get_num_threads()}")
    ok, why = attention.xformers_status()
    print(f"xformers      kernels {'load' if ok else 'do not load'}: {why}")
    if ok is False and "not installed" not in why:
        try:  # its own extension is worth reporting even where CUDA is missing
            problem = attention.extension_problem()
            print(f"              {problem or 'its C++/CUDA extension loaded'}")
        except ImportError as e:
            print(f"              importing xformers failed: {e}")
    for impl in ("sdpa", "xformers"):
        print(f"attention     attn_implementation={impl!r} -> {attention.runs_as(impl)}")
    if ns.model:
        from ..modeling import MMARModel
        from ..sequence import MMARProcessor

        model = MMARModel.from_pretrained(ns.model)
        processor = MMARProcessor.from_pretrained(ns.model)
        for part, runs in attention.attention_report(model, processor):
            print(f"  {part}: {runs}")
    return 0


def _package_version(name: str) -> str:
    """A package's version from its metadata (nothing imported), or "not installed"."""
    import importlib.metadata

    dist = {"sklearn": "scikit-learn"}.get(name, name)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (and exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _command(sub, name: str, func, help: str, epilog: str) -> argparse.ArgumentParser:
    """The subparser of command ``name``, which runs ``func``; its ``--help`` ends with ``epilog`` (the
    examples, laid out as written)."""
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _add_train(sub) -> None:
    """The ``train`` subcommand's arguments."""
    from ..training.arguments import add_arguments

    p = _command(sub, "train", cmd_train, help="train or fine-tune a model", epilog=EXAMPLES)
    add_arguments(p)


def _add_eval(sub) -> None:
    """The ``eval`` subcommand's arguments."""
    p = _command(sub, "eval", cmd_eval, help="evaluate a model on a built-in task", epilog=EXAMPLES)
    p.add_argument("--model", required=True, help="model directory")
    from ..eval import TASKS

    p.add_argument("--task", default="digits", choices=list(TASKS))
    p.add_argument("--output", help="write the metrics here as JSON")
    p.add_argument("--grid", help="write the generated images here as a PNG grid (default: next to --output)")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the model's setting)")
    p.add_argument("--image_guidance_scale", type=float, default=None,
                   help="scenes: dual guidance of the edits, the input image's scale (default: off)")
    p.add_argument("--image_temperature", type=float, default=None,
                   help="the diffusion head's sampling temperature (default: the model's setting)")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--per_digit", type=int, default=None,
                   help="digits, spoken-digits: generated items per digit (default 10)")
    p.add_argument("--num_prompts", type=int, default=None,
                   help="shapes, scenes: generated images (default 120; scenes: spread over the six categories)")
    p.add_argument("--num_qa_scenes", type=int, default=None,
                   help="shapes, scenes: held-out scenes whose questions are asked (default: shapes all, scenes 100)")
    p.add_argument("--num_edits", type=int, default=None, help="scenes: held-out editing requests (default 60)")
    p.add_argument("--data_files", default=None,
                   help="jsonl: your held-out chat records (the last assistant message is the reference)")
    p.add_argument("--max_samples", type=int, default=None, help="jsonl: evaluate the first N records only")
    p.add_argument("--seed", type=int, default=0)


def _add_generate(sub) -> None:
    """The ``generate`` subcommand's arguments."""
    p = _command(sub, "generate", cmd_generate, help="generate text and images from a prompt",
                 epilog=GENERATE_EXAMPLES)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    _add_media_arguments(p, "{} as input (repeatable)")
    p.add_argument("--mode", default="auto", choices=_modes())
    p.add_argument("--num", type=_count(1), default=1, help="how many samples (one seed each)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG for images; with --image_guidance_scale the instruction's scale (default: the model's)")
    p.add_argument("--image_guidance_scale", type=float, default=None,
                   help="editing: dual guidance, the input image's scale (InstructPix2Pix; default: off)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's setting)")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, one of the sizes the model was trained on (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (likewise)")
    p.add_argument("--output", default="outputs")


def _add_chat(sub) -> None:
    """The ``chat`` subcommand's arguments."""
    p = _command(sub, "chat", cmd_chat, help="chat with a model in the terminal", epilog=CHAT_EXAMPLES)
    p.add_argument("--model", required=True, help="model directory")
    _add_media_arguments(p, "attach {} to the first message")
    p.add_argument("--output_dir", default=os.path.join("outputs", "chat"), help="where generated images go")
    p.add_argument("--mode", default="auto", choices=_modes(),
                   help="auto: the model chooses between text and images / audio")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's setting)")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG for images (default: the model's)")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", type=_bool, default=False, metavar="BOOL",
                   help="send earlier turns to the model too (for models trained on multi-turn chats; "
                        "the built-in digits model answers each message on its own)")


def _add_demo(sub) -> None:
    """The ``demo`` subcommand's arguments."""
    p = _command(sub, "demo", cmd_demo, help="serve the Gradio demo", epilog=DEMO_EXAMPLES)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=_count(1), default=7860)
    p.add_argument("--share", type=_bool, default=False, metavar="BOOL", help="make a public gradio.live link")
    p.add_argument("--auth", type=_auth, default=None, metavar="USER:PASSWORD",
                   help="ask for this login (advised whenever --host is not 127.0.0.1 or --share is on)")
    p.add_argument("--max_new_tokens", type=_count(1), default=64, help="upper limit of the reply length")
    p.add_argument("--max_prompt_chars", type=_count(1), default=500, help="longest prompt accepted")
    p.add_argument("--max_context_tokens", type=_count(1), default=None,
                   help="longest remembered conversation in tokens (default 1024, at most the backbone's positions)")
    p.add_argument("--queue_size", type=_count(1), default=16, help="requests waiting at most; more are refused")
    p.add_argument("--memory", type=_bool, default=False, metavar="BOOL",
                   help="the Chat tab's 'remember earlier turns' default (see mmar chat --help)")
    p.add_argument("--examples", default="digits", choices=["digits", "none"],
                   help="example prompts shown under the inputs (default: the built-in digits task's)")


def _add_train_tokenizer(sub) -> None:
    """The ``train-tokenizer`` subcommand's arguments."""
    p = _command(sub, "train-tokenizer", cmd_train_tokenizer,
                 help="learn a tokenizer's weights (e.g. the image-vq codebook)",
                 epilog="example:\n  mmar train-tokenizer --config configs/vq-digits.yaml")
    p.add_argument("--config", required=True, help="YAML: tokenizer spec, dataset, steps, batch_size, output_dir")
    p.add_argument("--output_dir", help="overrides the config's output_dir")


def _add_merge_lora(sub) -> None:
    """The ``merge-lora`` subcommand's arguments."""
    p = _command(sub, "merge-lora", cmd_merge_lora, help="merge a LoRA adapter into its base model",
                 epilog="example:\n  mmar merge-lora --adapter runs/lora --output runs/merged")
    p.add_argument("--adapter", required=True, help="adapter directory written by `mmar train` with lora")
    p.add_argument("--base", help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="where to write the merged model")


def _add_distill_head(sub) -> None:
    """The ``distill-head`` subcommand's arguments."""
    p = _command(sub, "distill-head", cmd_distill_head,
                 help="distil a model's diffusion / flow head into a 1-2-step head",
                 epilog="examples:\n  mmar distill-head --model runs/digits --output runs/digits-fast\n"
                        "  mmar distill-head --model runs/digits --output runs/digits-2step --steps 2\n\n"
                        "The backbone is frozen; the method: mmar/heads/fewstep.py.")
    p.add_argument("--model", required=True, help="trained model directory (the teacher)")
    p.add_argument("--output", required=True, help="where to write the model with the few-step head")
    p.add_argument("--steps", type=_count(1), default=1, help="the student's sampling steps (default 1)")
    p.add_argument("--teacher_steps", type=_count(1), default=50, help="the teacher's sampling steps (default 50)")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=None, metavar="W",
                   help="CFG scales to distil (default: 1 and the model's default scale)")
    p.add_argument("--pairs", type=_count(1), default=16384,
                   help="teacher samples per guidance scale (each: a condition and fresh noise)")
    p.add_argument("--max_steps", type=_count(1), default=1500)
    p.add_argument("--batch_size", type=_count(1), default=512)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--modality", default=None,
                   help="the head to distil (default: the model's only diffusion / flow head)")
    p.add_argument("--dataset", default="digits", help="the training data the conditions come from")
    p.add_argument("--data_files", nargs="+", default=None, help="for --dataset jsonl: the JSONL files")
    p.add_argument("--max_samples", type=_count(1), default=None,
                   help="use the first N generation samples of the data (default: all)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--embedded_guidance", type=_bool, default=False, metavar="BOOL",
                   help="distil the guidance into the head: it draws guided tokens from the conditional branch "
                        "alone, so sampling under CFG runs no unconditional copy (about half the backbone cost)")
    p.add_argument("--num_threads", type=_count(0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--progress", type=_bool, default=True, metavar="BOOL", help="show a progress bar")


def _add_env(sub) -> None:
    """The ``env`` subcommand's arguments."""
    p = _command(sub, "env", cmd_env, help="print versions, devices and which attention kernels run",
                 epilog="examples:\n  mmar env\n  mmar env --model runs/digits   # the attention each part runs")
    p.add_argument("--model", help="also say which attention each part of this model directory runs")


def build_parser() -> argparse.ArgumentParser:
    """The ``mmar`` parser: one subparser per command, each built by its ``_add_<command>``."""
    parser = _Parser(prog="mmar", description="unified multimodal autoregressive models",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_generate, _add_chat, _add_demo, _add_train_tokenizer, _add_merge_lora,
                _add_distill_head, _add_env):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (OSError, ValueError, TypeError, ImportError) as e:  # user errors: one line, never a traceback
        print(f"mmar {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmar {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
