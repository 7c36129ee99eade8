"""``mmar chat``: a terminal chat with a model. Replies stream as they are generated; images (and
audio clips) the model makes are saved as PNG (WAV) files and their paths printed. Lines starting
with ``!`` are commands."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

import torch

from ..io import kind_of, save_output
from ..pipeline import MMARPipeline
from ..types import (Audio, Image, Item, Message, parse_part, segment_class, segment_modalities,
                     to_messages)

def commands_help(modalities: list[str]) -> str:
    """The ``!`` commands, with one attach command per modality the model takes."""
    attach = [f"  !{m} PATH".ljust(16) + f"attach {segment_class(m).noun or m} to your next message (repeatable)"
              for m in modalities]
    return "\n".join(["commands:", *attach,
                      "  !save PATH    save the conversation as JSON, its images / audio as files next to it",
                      "  !clear        forget the conversation and start again",
                      "  !help         show this list",
                      "  !exit         quit (Ctrl-D too)"])


COMMANDS = commands_help(segment_modalities())  # every modality mmar knows, for `mmar chat --help`


class ChatSession:
    """One conversation: its history, attachments waiting for the next message, and where generated
    images go. ``memory``: send the earlier turns to the model too (for models trained on multi-turn
    chats); without it each message is answered on its own, and the history is kept for ``!save``."""

    def __init__(self, pipe: MMARPipeline, output_dir: str, out: TextIO = sys.stdout, seed: int = 0,
                 memory: bool = False, **generation: Any):
        self.pipe, self.output_dir, self.out, self.memory = pipe, output_dir, out, memory
        self.generation = {k: v for k, v in generation.items() if v is not None}
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[Message] = []
        self.pending: list[Image | Audio] = []
        self.saved = 0

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # -- attachments ---------------------------------------------------------------------------
    def attach(self, modality: str, path: str) -> None:
        """Attach a file to the next message; it is opened and checked now (images fitted to the model)."""
        self.pending.append(self.pipe.load(modality, path))

    def attach_image(self, path: str) -> None:
        self.attach(Image.modality, path)

    def attach_audio(self, path: str) -> None:
        self.attach(Audio.modality, path)

    # -- one turn ------------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        content = [*self.pending, *([text] if text.strip() else [])]
        if not content:
            return
        self.history.append(Message("user", content))
        self.pending = []
        segments: list[Any] = []
        self.say("mmar> ", end="")
        fresh_line = True  # nothing written after the prompt or the last image line yet
        try:
            context = self.history if self.memory else self.history[-1:]
            for piece in self.pipe.chat(context, stream=True, generator=self.generator, **self.generation):
                if isinstance(piece, str):
                    self.say(piece, end="")
                    fresh_line = False
                    if segments and isinstance(segments[-1], str):
                        segments[-1] += piece
                    else:
                        segments.append(piece)
                else:
                    self.say(("" if fresh_line else "\n") + f"[{kind_of(piece)}: {self._save_generated(piece)}]")
                    fresh_line = True
                    segments.append(parse_part(piece))  # a PIL image becomes an Image segment
        except (ValueError, TypeError, FileNotFoundError) as e:
            self.history.pop()
            self.say(f"\nerror: {e}")
            return
        except KeyboardInterrupt:
            self.say(" [interrupted]", end="")
            fresh_line = False
        if not fresh_line or not segments:
            self.say()
        kept = [s for s in segments if not isinstance(s, str) or s.strip()]
        self.history.append(Message("assistant", kept))

    def _save_generated(self, item) -> str:
        if not self.saved:
            self.output_dir = os.path.join(self.output_dir, time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(self.output_dir, exist_ok=True)
        self.saved += 1
        return save_output(item, os.path.join(self.output_dir, f"{kind_of(item)}{self.saved}"))

    # -- transcript ----------------------------------------------------------------------------
    def save(self, path: str) -> list[str]:
        """Write the conversation as JSON (typed content parts, as :meth:`MMARPipeline.chat` reads them);
        every image (generated clip) in it is written next to it as ``<name>_<k>.png`` (``.wav``);
        attached audio files are referred to by their path. Returns the files written."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        files = [path]

        def write(item: Item) -> str:  # an item held in memory goes next to the transcript
            files.append(save_output(item, os.path.join(folder, f"{stem}_{len(files)}")))
            return os.path.basename(files[-1])

        messages = to_messages(self.history, save=write)
        record = {"model": self.pipe.model.name_or_path, "generation": self.generation,
                  "messages": messages}
        with open(path, "w") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
        return files

    # -- the loop ------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run one ``!`` command; False means quit."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        if name == "help":
            self.say(commands_help(self.pipe.modalities))
        elif name == "clear":
            self.history, self.pending = [], []
            self.say("(conversation cleared)")
        elif (name in segment_modalities() or name == "save") and not arg:
            self.say(f"error: !{name} needs a PATH")
        elif name in segment_modalities():  # the model says whether it takes this modality
            self.attach(name, arg)
            self.say(f"(attached {arg}; it goes with your next message)")
        elif name == "save":
            files = self.save(arg)
            self.say(f"(saved {files[0]}" + (f" and {len(files) - 1} image(s) next to it)" if len(files) > 1 else ")"))
        else:
            self.say(f"error: unknown command !{name}\n{commands_help(self.pipe.modalities)}")
        return True

    def run(self, stdin: TextIO = sys.stdin) -> int:
        interactive = stdin.isatty()
        self.say("mmar chat: type a message and press Enter; !help lists the commands, !exit quits.")
        while True:
            if interactive:
                self.out.write("you> ")
                self.out.flush()
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                self.say()
                return 0
            if not line:  # end of input
                return 0
            line = line.rstrip("\n")
            if not interactive:
                self.say(f"you> {line}")
            try:
                if line.startswith("!"):
                    if not self.command(line):
                        return 0
                else:
                    self.reply(line)
            except (ValueError, TypeError, FileNotFoundError, OSError) as e:
                self.say(f"error: {e}")
