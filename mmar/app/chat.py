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

from ..io import kind_of, save_output, save_wav
from ..pipeline import MMARPipeline
from ..types import Audio, Image, Message, Text

COMMANDS = """commands:
  !image PATH   attach an image to your next message (repeatable)
  !audio PATH   attach an audio clip to your next message
  !save PATH    save the conversation as JSON, its images / audio as files next to it
  !clear        forget the conversation and start again
  !help         show this list
  !exit         quit (Ctrl-D too)"""


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
    def attach_image(self, path: str) -> None:
        self.pending.append(Image(self.pipe.load_image(path)))  # opens, checks and fits the file now

    def attach_audio(self, path: str) -> None:
        if "audio" not in self.pipe.processor.modality_tokenizers:
            handles = ", ".join(self.pipe.processor.modality_tokenizers) or "text only"
            raise ValueError(f"{path}: this model has no audio tokenizer (it handles {handles})")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: audio file not found")
        self.pending.append(Audio(path))

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
                    segments.append(piece if isinstance(piece, Audio) else Image(piece))
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
        files, messages = [path], []
        for msg in self.history:
            parts = []
            for seg in msg.content:
                if isinstance(seg, Text):
                    parts.append({"type": "text", "text": seg.text})
                elif isinstance(seg, Image):
                    name = f"{stem}_{len(files)}.png"
                    seg.image.save(os.path.join(folder, name))
                    files.append(os.path.join(folder, name))
                    parts.append({"type": "image", "path": name})
                elif isinstance(seg.waveform, (str, os.PathLike)):
                    parts.append({"type": "audio", "path": os.path.abspath(seg.waveform)})
                else:
                    name = f"{stem}_{len(files)}.wav"
                    files.append(save_wav(seg, os.path.join(folder, name)))
                    parts.append({"type": "audio", "path": name})
            messages.append({"role": msg.role, "content": parts})
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
            self.say(COMMANDS)
        elif name == "clear":
            self.history, self.pending = [], []
            self.say("(conversation cleared)")
        elif name in ("image", "audio", "save") and not arg:
            self.say(f"error: !{name} needs a PATH")
        elif name == "image":
            self.attach_image(arg)
            self.say(f"(attached {arg}; it goes with your next message)")
        elif name == "audio":
            self.attach_audio(arg)
            self.say(f"(attached {arg}; it goes with your next message)")
        elif name == "save":
            files = self.save(arg)
            self.say(f"(saved {files[0]}" + (f" and {len(files) - 1} image(s) next to it)" if len(files) > 1 else ")"))
        else:
            self.say(f"error: unknown command !{name}\n{COMMANDS}")
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
