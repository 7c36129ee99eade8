"""The leaf data types every layer shares: segments (each knows its modality), messages, roles, and the
one reader and writer of chat content parts.

No torch and no other mmar module (numpy and PIL only): `sequence`, `io`, the tokenizers, data, pipeline
and the front doors import these names from here, so none of them has to import another to say "an audio clip".

A non-text segment subclasses :class:`Item` and is registered with :func:`register_segment`; its
``modality`` is the name configs, content parts (``{"type": modality, ...}``), ``media=`` and the
special tokens use. Adding a modality is such a class plus a tokenizer of that modality.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image as PILImage

IGNORE = -100
ROLES = ("system", "user", "assistant")
TEXT = "text"  # the type of a text content part
FILE = "file"  # gradio's file parts: {"type": "file", "file": {"path", "mime_type"}}, or a bare {"path": ...}

_SEGMENTS: dict[str, type[Item]] = {}  # modality -> segment class, in registration order


@dataclass
class Text:
    text: str


class Item:
    """Base of the segments holding one item of a non-text modality (an image, an audio clip, ...).
    Subclasses are dataclasses whose first field is the item: a path or an in-memory object."""

    modality: ClassVar[str] = ""
    mime: ClassVar[str] = ""  # top-level MIME type of its files ("image" for image/png); "" if none
    noun: ClassVar[str] = ""  # one item in help texts, e.g. "an image"

    @property
    def value(self) -> Any:
        """The item as given: a path, or an in-memory object."""
        return getattr(self, next(iter(self.__dataclass_fields__)))

    @property
    def path(self) -> str | None:
        """The item's file when it is given by path, else None."""
        return os.fspath(self.value) if isinstance(self.value, (str, os.PathLike)) else None

    def raw(self) -> Any:
        """What the modality tokenizer's ``preprocess`` takes."""
        return self.value

    @classmethod
    def claims(cls, value: Any) -> bool:
        """Whether a bare value (not a segment, not a part) is an item of this modality."""
        return False

    @classmethod
    def accepts(cls, value: Any) -> bool:
        """Whether ``value`` may stand for an item in a content part (paths are checked apart)."""
        return isinstance(value, cls) or cls.claims(value) or hasattr(value, "shape")  # arrays, tensors

    @classmethod
    def from_value(cls, value: Any, part: dict | None = None) -> Item:
        """The segment for ``value`` (a path or an item; ``part``: the content part it came from)."""
        return value if isinstance(value, cls) else cls(value)


def register_segment(cls: type[Item]) -> type[Item]:
    """Class decorator: make ``cls`` the segment of its ``modality``."""
    if not (isinstance(cls, type) and issubclass(cls, Item)) or not cls.modality or cls.modality in (TEXT, FILE):
        raise ValueError(f"a segment class subclasses Item and names its modality (not {TEXT!r} / {FILE!r})")
    if _SEGMENTS.get(cls.modality, cls) is not cls:
        raise ValueError(f"modality {cls.modality!r} already has the segment {_SEGMENTS[cls.modality].__name__}")
    _SEGMENTS[cls.modality] = cls
    return cls


def segment_modalities() -> list[str]:
    """The modalities with a segment class, in registration order."""
    return list(_SEGMENTS)


def segment_class(modality: str) -> type[Item]:
    if modality not in _SEGMENTS:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(_SEGMENTS) or 'none'}")
    return _SEGMENTS[modality]


@register_segment
@dataclass
class Image(Item):
    image: Any  # PIL image, uint8 array, float tensor [C, H, W] in [0, 1], or a path

    modality: ClassVar[str] = "image"
    mime: ClassVar[str] = "image"
    noun: ClassVar[str] = "an image"

    @classmethod
    def claims(cls, value: Any) -> bool:
        return isinstance(value, (PILImage.Image, np.ndarray))


@register_segment
@dataclass
class Audio(Item):
    waveform: Any  # 1-D array or a path
    sampling_rate: int | None = None

    modality: ClassVar[str] = "audio"
    mime: ClassVar[str] = "audio"
    noun: ClassVar[str] = "an audio clip"

    def raw(self) -> Any:
        return self.waveform, self.sampling_rate

    @classmethod
    def accepts(cls, value: Any) -> bool:
        return super().accepts(value) or (isinstance(value, tuple) and len(value) == 2)

    @classmethod
    def from_value(cls, value: Any, part: dict | None = None) -> Audio:
        """A path, an :class:`Audio`, a ``(waveform, sampling_rate)`` pair, or a waveform (its rate from
        the part's ``sampling_rate``)."""
        if isinstance(value, Audio):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        return cls(value, (part or {}).get("sampling_rate"))


Segment = Text | Image | Audio  # the built-in segments; any registered Item subclass is one too


def modality_of(value: Any) -> str | None:
    """The modality of a segment, a bare item (a PIL image is an image), a ``(modality, tokens)`` pair of
    latents or a pipeline output; ``"text"`` for strings; None when nothing claims it."""
    if isinstance(value, (str, Text)):
        return TEXT
    if isinstance(value, Item):
        return value.modality
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] in _SEGMENTS:
        return value[0]
    return next((m for m, cls in _SEGMENTS.items() if cls.claims(value)), None)


def modality_of_file(path: str | os.PathLike, mime_type: str | None = None) -> str:
    """Which modality a file holds, from its MIME type (given, or guessed from its name)."""
    kind = mime_type or mimetypes.guess_type(os.fspath(path))[0] or ""
    found = next((m for m, cls in _SEGMENTS.items() if cls.mime and kind.startswith(cls.mime + "/")), None)
    if found is None:
        kinds = ", ".join(f"{cls.mime}/*" for cls in _SEGMENTS.values() if cls.mime)
        raise ValueError(f"{os.fspath(path)}: cannot tell what this file holds (type {kind or 'unknown'}; "
                         f"readable: {kinds})")
    return found


@dataclass
class Message:
    role: str
    content: list[Segment] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if isinstance(self.content, (str, Text, Item)):
            self.content = [self.content]
        self.content = [Text(s) if isinstance(s, str) else s for s in self.content]
        for s in self.content:
            if not isinstance(s, (Text, Item)):
                kinds = ", ".join(["Text", *(c.__name__ for c in _SEGMENTS.values())])
                raise TypeError(f"a message segment must be one of {kinds}, got {type(s).__name__}")


def as_messages(sample: Any) -> list[Message]:
    """Accept a list of Messages, chat dicts ``{"role", "content"}``, or bare segments (one assistant turn)."""
    if isinstance(sample, (str, Text, Item)):
        sample = [sample]
    if not isinstance(sample, (list, tuple)) or len(sample) == 0:
        raise ValueError("a sample must be a non-empty list of messages or segments")
    if all(isinstance(m, Message) for m in sample):
        return list(sample)
    if all(isinstance(m, dict) and "role" in m for m in sample):
        return [Message(m["role"], m.get("content", [])) for m in sample]
    return [Message("assistant", list(sample))]


# -- chat content parts: the one reader ---------------------------------------------------------------
def _text(text: Any) -> Text:
    if not isinstance(text, str):
        raise ValueError(f"a text part needs a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty text part: give some text, or leave the part out")
    return Text(text)


def _file(path: Any, modality: str, root: str | None) -> str:
    """A path of a content part, relative to ``root`` (a data file's folder) when given; it must exist."""
    path = os.fspath(path)
    if root is not None and not os.path.isabs(path):
        path = os.path.join(root, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {modality} file not found")
    return path


def _from_dict(part: dict, root: str | None) -> Text | Item:
    kind = part.get("type")
    if kind == TEXT:
        return _text(part.get("text"))
    if kind == FILE or (kind is None and "path" in part):
        file = part.get("file", part)
        if not isinstance(file, dict) or not isinstance(file.get("path"), (str, os.PathLike)):
            raise ValueError(f"a file part needs a 'path', got {str(part)[:80]!r}")
        kind = modality_of_file(file["path"], file.get("mime_type"))
        return segment_class(kind).from_value(_file(file["path"], kind, root), part)
    if kind not in _SEGMENTS:
        raise ValueError(f"cannot read a chat content part of type {kind!r}; known types: "
                         f"{', '.join([TEXT, *_SEGMENTS, FILE])}")
    cls = _SEGMENTS[kind]
    for key in (kind, "path"):
        value = part.get(key)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_value(_file(value, kind, root), part)
        if value is not None and key == kind and cls.accepts(value):
            return cls.from_value(value, part)
    raise ValueError(f"a {kind} part needs a {kind!r} (the item) or a 'path', got {str(part)[:80]!r}")


def parse_part(part: Any, root: str | None = None) -> Text | Item:
    """One chat content part -> a segment. A part is a segment, a string, a bare item a segment class
    claims (a PIL image or an array is an image), or a typed dict as in chat templates:
    ``{"type": "text", "text"}``, ``{"type": <modality>, <modality>: item | "path": file}`` (an audio
    part may add ``sampling_rate``), or gradio's ``{"type": "file", "file": {"path"}}`` / ``{"path"}``
    (the modality from the file's type). Paths are relative to ``root`` when it is given and must exist;
    text must not be blank. Anything else raises ``ValueError`` (``FileNotFoundError`` for a missing file)."""
    if isinstance(part, (Text, Item)):
        return part
    if isinstance(part, str):
        return _text(part)
    if isinstance(part, dict):
        return _from_dict(part, root)
    cls = next((c for c in _SEGMENTS.values() if c.claims(part)), None)
    if cls is not None:
        return cls.from_value(part)
    raise ValueError(f"cannot read a chat content part {part!r:.80}; give a string, an image, or "
                     '{"type": "text", "text": ...} / {"type": "image", "image": ...}')


def parse_content(content: Any, root: str | None = None) -> list[Text | Item]:
    """A message's content (one part, or a list of parts) -> its segments."""
    parts = content if isinstance(content, (list, tuple)) else [content]
    return [parse_part(p, root) for p in parts]


def parse_message(message: Message | dict, root: str | None = None) -> Message:
    """A :class:`Message`, or a ``{"role", "content"}`` dict whose content :func:`parse_content` reads."""
    if isinstance(message, Message):
        return message
    if not isinstance(message, dict) or "role" not in message:
        got = f"keys {sorted(message)}" if isinstance(message, dict) else f"a {type(message).__name__}"
        raise ValueError(f"a chat message needs a 'role' and a 'content', got {got}")
    if message["role"] not in ROLES:
        raise ValueError(f"unknown role {message['role']!r}; expected one of {ROLES}")
    return Message(message["role"], parse_content(message.get("content", []), root))


# -- chat content parts: the one writer ---------------------------------------------------------------
def to_part(segment: Any, save: Callable[[Item], str] | None = None) -> dict:
    """A segment (or a string) -> a typed content part :func:`parse_part` reads back. An item given by
    path is referred to by its absolute path; one held in memory is written by ``save(segment)``, which
    returns the path to record."""
    if isinstance(segment, str):
        segment = Text(segment)
    if isinstance(segment, Text):
        return {"type": TEXT, "text": segment.text}
    if not isinstance(segment, Item):
        raise TypeError(f"cannot write a {type(segment).__name__} as a content part")
    if segment.path is not None:
        return {"type": segment.modality, "path": os.path.abspath(segment.path)}
    if save is None:
        raise ValueError(f"the {segment.modality} is held in memory: give save= to write it to a file")
    return {"type": segment.modality, "path": save(segment)}


def to_messages(messages: Iterable[Message], save: Callable[[Item], str] | None = None) -> list[dict]:
    """Messages -> ``[{"role", "content": [parts]}]``, the JSON form of a conversation (and of a JSONL record)."""
    return [{"role": m.role, "content": [to_part(s, save) for s in m.content]} for m in messages]
