"""Automatic evaluators for the built-in tasks."""

from __future__ import annotations

from typing import Any

TASKS = ("digits",)


def evaluate(task: str, model_dir: str, **kwargs) -> dict[str, Any]:
    if task == "digits":
        from .digits import evaluate_digits

        return evaluate_digits(model_dir, **kwargs)
    raise ValueError(f"unknown task {task!r}; built in: {', '.join(TASKS)}")
