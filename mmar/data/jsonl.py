"""User data: interleaved chat records in JSON Lines (or any local HF ``datasets`` json / parquet).

One record per line::

    {"messages": [
      {"role": "user", "content": [{"type": "image", "path": "imgs/a.png"},
                                   {"type": "text", "text": "which digit is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "7"}]}]}

``content`` may also be a plain string. Image / audio paths are relative to the
data file. Only the assistant's turns are trained on. A bad record (broken
JSON structure, unknown role or type, missing file, unreadable image) is
skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from ..types import ROLES, Message, parse_message


class BadSample(str):
    """Stands in for a record that could not be read; its text is the reason."""


class BadRecord(ValueError):
    """A record that cannot be turned into a sample; the loader skips and counts it."""


def record_to_messages(record: Any, root: str, where: str = "record") -> list[Message]:
    """A record -> its messages, read by the one content-part reader (:func:`mmar.types.parse_message`;
    paths relative to ``root``). A training record also needs content in every message and an assistant
    turn; anything wrong raises :class:`BadRecord` naming ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise BadRecord(f"{where}: expected {{'messages': [...]}} with at least one message")
    messages = []
    for i, msg in enumerate(record["messages"]):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise BadRecord(f"{where}: message {i} needs a role in {ROLES}")
        if not isinstance(msg.get("content"), (str, list)) or not msg["content"]:
            raise BadRecord(f"{where}: message {i} has no content")
        try:
            messages.append(parse_message(msg, root))
        except (ValueError, TypeError, OSError) as e:
            raise BadRecord(f"{where}: message {i}: {e}") from e
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord(f"{where}: no assistant message, nothing to train on")
    return messages


class JsonLines:
    """Random access to the lines of a JSON Lines file (offsets indexed once, lines parsed on demand),
    so that one broken line is one bad record, not a broken dataset."""

    def __init__(self, path: str):
        self.path, self.offsets = path, []
        with open(path, "rb") as f:
            at = 0
            for line in f:
                if line.strip():
                    self.offsets.append(at)
                at += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, idx: int) -> Any:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[idx])
            line = f.readline()
        try:
            return json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRecord(f"{self.path} line {idx + 1}: not valid UTF-8 JSON ({e})") from e


def _check_files(data_files: str | list[str]) -> list[str]:
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    if not files:
        raise ValueError("no data files given")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: data file not found")
    return files


def _texts_of(records) -> list[str]:
    out = []
    for rec in records:
        if not isinstance(rec, dict):
            continue
        for msg in rec.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


class ChatDataset(Dataset):
    """Chat records from a local JSON Lines file (read line by line) or JSON / parquet files
    (through HF ``datasets``; there a column must have one type in every record)."""

    def __init__(self, data_files: str | list[str], split: str = "train"):
        files = _check_files(data_files)
        self.root = os.path.dirname(os.path.abspath(files[0]))
        self.name, self.split = files[0], split
        if len(files) == 1 and files[0].endswith(".jsonl"):
            self.data = JsonLines(files[0])
            return
        from datasets import load_dataset

        fmt = "parquet" if files[0].endswith(".parquet") else "json"
        try:
            self.data = load_dataset(fmt, data_files=files, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a broken file
            raise ValueError(f"{files[0]}: cannot read as {fmt} ({type(e).__name__}: {e})") from e

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> list[Message]:
        return record_to_messages(self.data[idx], self.root, where=f"{self.name} record {idx}")

    def texts(self, indices: list[int] | None = None) -> list[str]:
        """All text (or that of the records at ``indices``), for training a BPE when the model has no
        tokenizer yet."""

        def records():
            for i in range(len(self.data)) if indices is None else indices:
                try:
                    yield self.data[i]
                except BadRecord:
                    continue

        return _texts_of(records())


class StreamingChatDataset(IterableDataset):
    """The same records streamed through HF ``datasets`` (``streaming=True``): nothing is loaded or
    indexed up front, so a data set larger than memory (or disk cache) trains as well.

    Each epoch reads the files again through a shuffle buffer of ``shuffle_buffer`` records whose order
    is a function of (seed, epoch) (``IterableDataset.shuffle`` + ``set_epoch``), so a resumed run sees
    the same order. Items come as ``(position in the epoch, sample)``, a bad record as a
    :class:`BadSample`, like :class:`~mmar.data.registry.SafeDataset`'s. In several
    processes every process reads the stream and accelerate hands each its share of every batch."""

    is_stream = True

    def __init__(self, data_files: str | list[str], split: str = "train", seed: int = 0,
                 shuffle_buffer: int = 1000):
        from datasets import load_dataset

        files = _check_files(data_files)
        self.root = os.path.dirname(os.path.abspath(files[0]))
        self.name, self.split, self.seed, self.shuffle_buffer = files[0], split, seed, shuffle_buffer
        # JSON Lines stream as lines of text, parsed here: records may mix types (a string or a list of
        # parts as content) and a broken line is one bad record; .json / .parquet use their own builders
        self.lines = all(f.endswith(".jsonl") for f in files)
        fmt = "text" if self.lines else "parquet" if files[0].endswith(".parquet") else "json"
        try:
            self.data = load_dataset(fmt, data_files=files, split="train", streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a broken file
            raise ValueError(f"{files[0]}: cannot stream as {fmt} ({type(e).__name__}: {e})") from e
        self.epoch = 0

    def _parse(self, row: dict, where: str) -> Any:
        if not self.lines:
            return row
        try:
            return json.loads(row["text"])
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: not valid JSON ({e})") from e

    def _records(self):
        data = self.data.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer) if self.shuffle_buffer > 1 \
            else self.data
        data.set_epoch(self.epoch)
        it = iter(data)
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a broken file chunk: one bad record, and the epoch ends
                yield BadRecord(f"{self.name}: unreadable from here on ({type(e).__name__}: {e})")
                return

    def __iter__(self):
        for i, rec in enumerate(self._records()):
            if isinstance(rec, BadRecord):
                yield i, BadSample(str(rec))
                continue
            where = f"{self.name} record {i} (epoch {self.epoch})"
            try:
                yield i, record_to_messages(self._parse(rec, where), self.root, where=where)
            except (ValueError, TypeError, KeyError, OSError) as e:
                yield i, BadSample(str(e))

    def texts(self, limit: int = 100_000) -> list[str]:
        """The text of the first ``limit`` records, for training a BPE when the model has no tokenizer."""
        out = []
        for i, rec in enumerate(self.data):
            if i >= limit:
                break
            try:
                out += _texts_of([self._parse(rec, "")])
            except BadRecord:
                continue
        return out
