"""Spaces-style entry point: ``python demo/app.py`` serves the mmar demo.

The model directory comes from the environment variable MMAR_MODEL (default: runs/digits, which
`make demo` trains). Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT as usual; without them the
demo binds 127.0.0.1:7860, this machine only.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmar.demo import build_demo, digits_examples, launch  # noqa: E402
from mmar.pipeline import MMARPipeline  # noqa: E402

MODEL = os.environ.get("MMAR_MODEL", "runs/digits")


def main() -> int:
    try:
        pipe = MMARPipeline.from_pretrained(MODEL)
    except (OSError, ValueError) as e:
        print(f"demo/app.py: error: {e}\nSet MMAR_MODEL to a model directory, or run `make demo` to train "
              "the default one into runs/digits.", file=sys.stderr)
        return 2
    chat_examples, prompt_examples = digits_examples()
    demo = build_demo(pipe, chat_examples=chat_examples, prompt_examples=prompt_examples)
    launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
