"""The leaf data types every layer shares: segments (each knows its modality), messages and roles.

No torch, no tokenizers: `sequence`, `io`, the tokenizers, data, pipeline and the front doors import
these names from here, so none of them has to import another to say "an audio clip".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Text:
    text: str


@dataclass
class Image:
    image: Any  # PIL image, uint8 array, float tensor [C, H, W] in [0, 1], or a path


@dataclass
class Audio:
    waveform: Any  # 1-D array or a path
    sampling_rate: int | None = None


Segment = Text | Image | Audio
_MODALITY_OF = {Image: "image", Audio: "audio"}


@dataclass
class Message:
    role: str
    content: list[Segment] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if isinstance(self.content, (str, Text, Image, Audio)):
            self.content = [self.content]
        self.content = [Text(s) if isinstance(s, str) else s for s in self.content]
        for s in self.content:
            if not isinstance(s, (Text, Image, Audio)):
                raise TypeError(f"a message segment must be Text, Image or Audio, got {type(s).__name__}")


def as_messages(sample: Any) -> list[Message]:
    """Accept a list of Messages, chat dicts ``{"role", "content"}``, or bare segments (one assistant turn)."""
    if isinstance(sample, (str, Text, Image, Audio)):
        sample = [sample]
    if not isinstance(sample, (list, tuple)) or len(sample) == 0:
        raise ValueError("a sample must be a non-empty list of messages or segments")
    if all(isinstance(m, Message) for m in sample):
        return list(sample)
    if all(isinstance(m, dict) and "role" in m for m in sample):
        return [Message(m["role"], m.get("content", [])) for m in sample]
    return [Message("assistant", list(sample))]
