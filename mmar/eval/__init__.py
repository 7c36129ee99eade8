"""Automatic evaluators for the built-in tasks."""

from __future__ import annotations

from typing import Any

TASKS = ("digits", "spoken-digits", "shapes")


def evaluate(task: str, model_dir: str, **kwargs) -> dict[str, Any]:
    if task == "digits":
        from .digits import evaluate_digits

        return evaluate_digits(model_dir, **kwargs)
    if task == "spoken-digits":
        from .spoken_digits import evaluate_spoken_digits

        return evaluate_spoken_digits(model_dir, **kwargs)
    if task == "shapes":
        from .shapes import evaluate_shapes

        return evaluate_shapes(model_dir, **kwargs)
    raise ValueError(f"unknown task {task!r}; built in: {', '.join(TASKS)}")
