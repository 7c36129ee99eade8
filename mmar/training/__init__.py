"""Training: arguments (dataclasses), data (datasets + collator) and the accelerate loop."""

from .arguments import DataArguments, ModelArguments, TrainingArguments
from .trainer import train

__all__ = ["DataArguments", "ModelArguments", "TrainingArguments", "train"]
