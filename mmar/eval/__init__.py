"""Automatic evaluators for the built-in tasks, and ``jsonl`` (alias ``chat``) for a user's own records."""

from __future__ import annotations

from typing import Any

TASKS = ("digits", "digits-sizes", "spoken-digits", "shapes", "scenes", "jsonl", "chat")


def evaluate(task: str, model_dir: str, **kwargs) -> dict[str, Any]:
    if task == "digits":
        from .digits import evaluate_digits

        return evaluate_digits(model_dir, **kwargs)
    if task == "digits-sizes":
        from .digit_sizes import evaluate_digit_sizes

        return evaluate_digit_sizes(model_dir, **kwargs)
    if task == "spoken-digits":
        from .spoken_digits import evaluate_spoken_digits

        return evaluate_spoken_digits(model_dir, **kwargs)
    if task == "shapes":
        from .shapes import evaluate_shapes

        return evaluate_shapes(model_dir, **kwargs)
    if task == "scenes":
        from .scenes import evaluate_scenes

        return evaluate_scenes(model_dir, **kwargs)
    if task in ("jsonl", "chat"):
        from .jsonl import evaluate_jsonl

        return evaluate_jsonl(model_dir, **kwargs)
    raise ValueError(f"unknown task {task!r}; built in: {', '.join(TASKS)}")
