"""The Gradio demo: ``build_demo(pipeline) -> gr.Blocks`` and ``launch(demo)``.

Tabs: **Chat** (text + image uploads, streamed replies, generated images inline), **Generate**
(text-to-image with guidance scale, steps, seed and number of images), **Edit** (upload an image, type
an instruction, get the edited image: dual guidance with a text and an image scale) and **Model**
(config summary, parameter count, limits). Endpoints for ``gradio_client``: ``/chat``, ``/generate``
and ``/edit``.
All events share one concurrency slot, so one request runs at a time (the model is shared); the queue
is bounded. Every limit holds server-side, whatever a client sends: a remembered history ("remember
earlier turns" is the client's choice) is capped in tokens (``max_context_tokens``), like the prompt,
against the backbone's positions (:mod:`mmar.limits`). Messages shown to clients never name server
paths; the demo's temporary folder is removed when the demo goes away.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import ipaddress
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import weakref
from typing import Any

import gradio as gr
import torch
from PIL import Image as PILImage

from ..io import save_output
from ..limits import max_positions
from ..pipeline import MMARPipeline
from ..types import TEXT, Audio, Image, Item, Message, modality_of, modality_of_file, parse_part, segment_class

MAX_FILE_SIZE = "2mb"  # per upload
MAX_UPLOADS = 4  # files per chat message
MAX_HISTORY_MESSAGES = 32  # with memory on: earlier messages sent back to the model, at most ...
MAX_HISTORY_FILES = 16  # ... holding at most this many files ...
MAX_CONTEXT_TOKENS = 1024  # ... and, with the new message, at most this many tokens (or the backbone's positions)
FILE_AGE = 15 * 60  # seconds a displayed file stays in the demo's folder (gradio has copied it by then)
MAX_SEED = 2**32 - 1
DISPLAY_SIZE = 160  # generated images are shown scaled up (nearest neighbour) to at least this many pixels
NO_REPLY = "(no reply)"  # shown when the model stops at once; never sent back to it
CSS = "#gen-gallery img, .message img { image-rendering: pixelated; }"
# an absolute path (POSIX or Windows) inside a message: clients see its last component only
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"`]+)+")
log = logging.getLogger(__name__)


def public(message: str) -> str:
    """``message`` with every absolute path cut to its file name (server folders, gradio's temp paths,
    the model directory stay private)."""
    return _PATH.sub(lambda m: re.split(r"[\\/]", m.group(0))[-1], str(message))


def _client_errors(fn):
    """Turn a handler's errors into messages fit for a client: user errors (ValueError, TypeError, OSError,
    gr.Error) without server paths; anything else is logged here and shown as an internal error."""
    def refuse(e: BaseException) -> gr.Error:
        if isinstance(e, gr.Error):
            return gr.Error(public(e.message))
        if isinstance(e, (ValueError, TypeError, OSError)):
            return gr.Error(public(str(e)))
        log.exception("demo handler %s failed", fn.__name__)
        return gr.Error(f"Internal error ({type(e).__name__}); the server log has the details.")

    if inspect.isgeneratorfunction(fn):  # gradio streams generator functions: the wrapper must be one too
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every error reaches the client as a clean message
                raise refuse(e) from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every error reaches the client as a clean message
            raise refuse(e) from None
    return call


def _display(img: PILImage.Image, path: str) -> str:
    """Scale a small image up for display (pixel-exact) and save it as a PNG at ``path``; returns it."""
    factor = max(1, math.ceil(DISPLAY_SIZE / max(img.size)))
    img.resize((img.width * factor, img.height * factor), PILImage.NEAREST).save(path)
    return path


def model_summary(pipe: MMARPipeline, limits: dict[str, Any] | None = None) -> str:
    """Markdown: where the model comes from, its size, backbone, modalities and generation defaults."""
    cfg, model = pipe.model.config, pipe.model
    bb = cfg.backbone_config
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    lines = [f"**Model:** `{os.path.basename(os.path.normpath(str(model.name_or_path))) or 'in memory'}`  ",
             f"**Parameters:** {total / 1e6:.2f}M ({heads / 1e6:.2f}M in the modality heads), "
             f"{next(model.parameters()).dtype}, on `{pipe.device}`", "",
             "| part | settings |", "| --- | --- |",
             f"| backbone | `{bb.model_type}`: hidden {bb.hidden_size}, {bb.num_hidden_layers} layers, "
             f"{bb.num_attention_heads} attention heads, vocabulary {bb.vocab_size} |"]
    for m, spec in cfg.modalities.items():
        tok = {k: v for k, v in spec.tokenizer.items() if k != "name"}
        head = {k: v for k, v in spec.head.items() if k != "name"}
        size = f"(codes out of {spec.vocab_size})" if spec.kind == "discrete" else f"of {spec.token_dim} values"
        lines.append(f"| {m} tokenizer | `{spec.tokenizer.get('name')}` {tok}: {spec.num_tokens} tokens {size} "
                     f"per {m} |")
        lines.append(f"| {m} head | `{spec.head.get('name', 'diffusion')}` {head} |")
    unset = {"image_guidance_scale": "off"}  # None means off here, the head's own setting elsewhere
    gen = ", ".join(f"{k.replace('_', ' ')} {unset.get(k, '(head default)') if v is None else v}"
                    for k, v in vars(pipe.generation_config).items())
    lines += ["", f"**Generation defaults:** {gen}"]
    if limits:
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in limits.items())
        lines.append(f"  \n**Limits of this demo:** {shown}")
    return "\n".join(lines)


class _Handlers:
    """The event functions, bound to one pipeline and the demo's limits."""

    def __init__(self, pipe: MMARPipeline, max_new_tokens: int, max_prompt_chars: int, max_images: int,
                 max_context_tokens: int | None = None):
        self.pipe, self.max_new_tokens = pipe, max_new_tokens
        self.max_prompt_chars, self.max_images = max_prompt_chars, max_images
        positions = max_positions(pipe.model.config)
        self.max_context_tokens = min(t for t in (max_context_tokens or MAX_CONTEXT_TOKENS, positions) if t)
        self.folder = tempfile.mkdtemp(prefix="mmar-demo-")
        # removed when the handlers are collected or the interpreter exits, whichever comes first
        self.close = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def _new_path(self, suffix: str) -> str:
        """A fresh file in the demo's folder; files older than FILE_AGE go (gradio copied them long ago)."""
        now = time.time()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if now - entry.stat().st_mtime > FILE_AGE:
                        os.remove(entry.path)
                except OSError:
                    pass
        return os.path.join(self.folder, f"{uuid.uuid4().hex[:12]}{suffix}")

    def _check_prompt(self, text: str) -> str:
        text = (text or "").strip()
        if len(text) > self.max_prompt_chars:
            raise gr.Error(f"The prompt is {len(text)} characters long; "
                           f"this demo takes at most {self.max_prompt_chars}.")
        return text

    def _check_history(self, history: list[dict], text: str, uploads: int) -> None:
        """With memory on the earlier turns go to the model too: whatever the client sends, bound them in
        messages, files and tokens (with the new message), before any of their files is opened."""
        texts, items, files = [text] if text else [], {}, uploads
        for msg in history:
            content = msg.get("content") if isinstance(msg, dict) else None
            for part in content if isinstance(content, list) else [content]:
                if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"):
                    words = part if isinstance(part, str) else part.get("text")
                    if isinstance(words, str) and words.strip():
                        texts.append(words)
                elif part is not None:
                    files += 1
                    file = part.get("file", part) if isinstance(part, dict) else None
                    path = file.get("path") if isinstance(file, dict) else None
                    try:
                        modality = modality_of_file(str(path or ""))
                    except (ValueError, TypeError, AttributeError):  # refused when it is opened, if ever
                        modality = None
                    items[modality] = items.get(modality, 0) + 1
        advice = "Press Clear, or turn off 'remember earlier turns'."
        if len(history) > MAX_HISTORY_MESSAGES or files > MAX_HISTORY_FILES:
            raise gr.Error(f"The conversation is too long to remember ({len(history)} messages, {files} files; this "
                           f"demo takes at most {MAX_HISTORY_MESSAGES} and {MAX_HISTORY_FILES}). {advice}")
        cap = self.max_context_tokens
        try:  # cheap bounds first, so the text tokenized to count is bounded too
            tokens = self.pipe.limits.count_parts(len(history) + 1, texts, items, limit=cap)
        except ValueError as e:
            raise gr.Error(f"The conversation is too long to remember ({e}). {advice}") from e
        if tokens > cap:
            raise gr.Error(f"The conversation is too long to remember ({tokens} tokens; this demo takes at most "
                           f"{cap}). {advice}")

    def _load(self, modality: str, raw: Any, name: str) -> Item:
        """An input item, checked against the model and fitted to it (:meth:`MMARPipeline.load`)."""
        try:
            with warnings.catch_warnings(record=True) as notes:  # fitted to a trained size: say so in the page
                warnings.simplefilter("always")
                item = self.pipe.load(modality, raw)
        except (ValueError, TypeError, OSError) as e:  # e.g. a decompression bomb: a clear refusal
            raise gr.Error(f"Cannot use {name}: {public(e)}") from e
        for note in notes:
            gr.Warning(f"{name}: {note.message}")
        return item

    def _upload(self, path: str) -> Item:
        """An uploaded file as a segment of the modality its type says (images fitted to the model)."""
        try:
            modality = modality_of_file(path)
        except ValueError as e:
            raise gr.Error(f"Cannot use {os.path.basename(path)}: {e}") from e
        return self._load(modality, path, os.path.basename(path))

    def _show(self, item: Any) -> dict:
        """A segment (uploaded or generated) as a Chatbot file message."""
        kind = modality_of(item)
        if isinstance(item, Image) or kind == Image.modality:  # shown scaled up, pixel-exact
            return {"path": _display(item.image if isinstance(item, Image) else item, self._new_path(".png")),
                    "alt_text": kind}
        if isinstance(item, Item) and item.path is not None:
            return {"path": item.path, "alt_text": kind}
        return {"path": save_output(item, self._new_path("")), "alt_text": kind}

    def _conversation(self, history: list[dict]) -> list[Message]:
        """Chatbot messages (gradio's normalised format) -> mmar messages, read by the one content-part
        reader; blank text and the no-reply marker are dropped; consecutive turns of one role merge."""
        turns: list[tuple[str, list]] = []
        for msg in history or []:
            if msg.get("role") not in ("user", "assistant"):
                continue
            parts = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
            segs = []
            for part in parts:
                text = part if isinstance(part, str) else part.get("text") if part.get("type") == TEXT else None
                if text is not None:
                    segs += [text] if text.strip() and text != NO_REPLY else []
                    continue
                try:  # a file: {"type": "file", "file": {"path": ...}} or {"path": ...}
                    seg = parse_part(part)
                except (ValueError, FileNotFoundError) as e:
                    raise gr.Error(f"Cannot use an earlier file: {e}") from e
                segs.append(self._load(seg.modality, seg.value, os.path.basename(seg.path or seg.modality)))
            if turns and turns[-1][0] == msg["role"]:
                turns[-1][1].extend(segs)
            elif segs:
                turns.append((msg["role"], segs))
        return [Message(role, segs) for role, segs in turns if segs]

    @_client_errors
    def chat(self, message: dict | None, history: list[dict] | None, temperature: float, max_new_tokens: float,
             guidance_scale: float, memory: bool = False):
        """Stream the reply to ``message`` ({"text", "files"}); yields (chatbot, textbox) updates.
        ``memory``: send the earlier turns too (only for models trained on multi-turn chats)."""
        message, history = message or {}, list(history or [])
        text, files = self._check_prompt(message.get("text")), list(message.get("files") or [])
        if not text and not files:
            raise gr.Error("Type a message or attach a file.")
        if len(files) > MAX_UPLOADS:
            raise gr.Error(f"Attach at most {MAX_UPLOADS} files to one message.")
        if memory:  # the client's choice: bounded here all the same, before any file is opened
            self._check_history(history, text, len(files))
        uploads = [self._upload(f) for f in files]
        earlier = self._conversation(history) if memory else []
        conversation = earlier + [Message("user", [*uploads, *([text] if text else [])])]
        history += [{"role": "user", "content": self._show(item)} for item in uploads]
        if text:
            history.append({"role": "user", "content": text})
        yield history, None
        parts: list[Any] = []
        kwargs = dict(temperature=temperature, guidance_scale=guidance_scale,
                      max_new_tokens=max(1, min(int(max_new_tokens), self.max_new_tokens)))
        try:
            for piece in self.pipe.chat(conversation, stream=True, **kwargs):
                if isinstance(piece, str):
                    if parts and isinstance(parts[-1], str):
                        parts[-1] += piece
                    else:
                        parts.append(piece)
                else:
                    parts.append(self._show(piece))
                yield history + [{"role": "assistant", "content": list(parts)}], gr.skip()
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e)) from e
        if not parts:
            yield history + [{"role": "assistant", "content": NO_REPLY}], gr.skip()

    @_client_errors
    def generate(self, prompt: str, guidance_scale: float, num_inference_steps: float, seed: float,
                 num_images: float, size: str | None = None,
                 progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        """Text-to-image: ``num_images`` images, image i drawn with seed ``seed + i``; ``size`` is one of
        the trained sizes as ``"HxW"`` (models of several sizes)."""
        prompt = self._check_prompt(prompt)
        if not prompt:
            raise gr.Error("Type a prompt first.")
        n = max(1, min(int(num_images), self.max_images))
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise gr.Error(f"The seed must be between 0 and {MAX_SEED}, got {seed}.")
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        height, width = _parse_size(size)
        try:
            out = self.pipe([prompt] * n, mode=Image.modality, max_items=1, guidance_scale=guidance_scale,
                            num_inference_steps=int(num_inference_steps), generator=gens, height=height, width=width)
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e)) from e
        return [(_display(imgs[0], self._new_path(".png")), f"seed {seed + i}")
                for i, imgs in enumerate(out.images) if imgs]


    @_client_errors
    def edit(self, image: str | None, instruction: str, guidance_scale: float, image_guidance_scale: float,
             num_inference_steps: float, seed: float, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """Image editing: the uploaded ``image`` (a path) changed as ``instruction`` says, drawn with dual
        guidance (``guidance_scale`` for the instruction, ``image_guidance_scale`` for the input image)
        and ``seed``; returns the path of the edited image (shown scaled up)."""
        if not image:
            raise gr.Error("Upload an image to edit first.")
        instruction = self._check_prompt(instruction)
        if not instruction:
            raise gr.Error("Type an instruction first, e.g. 'make the circle blue'.")
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise gr.Error(f"The seed must be between 0 and {MAX_SEED}, got {seed}.")
        source = self._load(Image.modality, image, "the image")
        try:
            out = self.pipe(instruction, images=[source], mode=Image.modality, max_items=1,
                            guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                            num_inference_steps=int(num_inference_steps),
                            generator=[torch.Generator().manual_seed(seed)])
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e)) from e
        if not out.images[0]:
            raise gr.Error("The model drew no image; try another seed.")
        return _display(out.images[0][0], self._new_path(".png"))


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"8x12"`` -> ``(8, 12)``; nothing chosen -> ``(None, None)`` (the model's default)."""
    if not size:
        return None, None
    try:
        height, width = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise gr.Error(f"The size must read HEIGHTxWIDTH, e.g. 8x12, got {size!r}.") from None
    return height, width


def _chat_tab(h: _Handlers, max_new_tokens: int, chat_memory: bool, chat_examples: list[dict] | None) -> None:
    """The Chat tab: conversation, message box (text + uploads), sampling settings; endpoint ``/chat``."""
    defaults, modalities = h.pipe.generation_config, h.pipe.modalities
    has_audio = Audio.modality in modalities
    chatbot = gr.Chatbot(label="conversation", height=440, elem_id="chatbot",
                         placeholder="Ask for a drawing, or upload an image and ask about it.")
    kinds = [segment_class(m).mime for m in modalities if segment_class(m).mime]  # gradio's file types
    hint = f"; attach {' or '.join(kinds)} files with the clip button" if kinds else ""
    box = gr.MultimodalTextbox(placeholder="Type a message" + hint, file_types=kinds, file_count="multiple",
                               sources=["upload", "microphone"] if has_audio else ["upload"],
                               show_label=False, elem_id="chat-input")
    with gr.Accordion("Sampling settings", open=False):
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="temperature (0 = greedy)")
        chat_tokens = gr.Slider(1, max_new_tokens, value=min(defaults.max_new_tokens, max_new_tokens), step=1,
                                label="max new tokens")
        chat_cfg = gr.Slider(1.0, 10.0, value=defaults.guidance_scale, step=0.5, label="guidance scale (images)")
        memory = gr.Checkbox(value=chat_memory, label="remember earlier turns",
                             info="send the whole conversation to the model; models trained on single "
                                  "turns (like the built-in digits model) answer best with this off")
    if chat_examples:
        gr.Examples(chat_examples, inputs=[box], label="examples")
    box.submit(h.chat, [box, chatbot, temperature, chat_tokens, chat_cfg, memory], [chatbot, box],
               api_name="chat", concurrency_id="model")
    gr.ClearButton([chatbot, box], value="Clear")


def _generate_tab(h: _Handlers, max_prompt_chars: int, max_steps: int, max_images: int,
                  prompt_examples: list[str] | None) -> None:
    """The Generate tab: prompt, guidance, steps, seed, number of images; endpoint ``/generate``."""
    defaults = h.pipe.generation_config
    head_steps = next((s.head.get("num_inference_steps") for s in h.pipe.model.config.modalities.values()), 50)
    steps = int(defaults.num_inference_steps or head_steps or 50)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="prompt", max_length=max_prompt_chars, elem_id="gen-prompt",
                                placeholder="draw the digit seven")
            cfg = gr.Slider(1.0, 10.0, value=defaults.guidance_scale, step=0.5, label="guidance scale")
            n_steps = gr.Slider(1, max_steps, value=min(steps, max_steps), step=1, label="inference steps")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="number of images")
            sizes = [f"{height}x{width}" for height, width in h.pipe.image_sizes()]  # trained sizes, default first
            size_choice = [gr.Dropdown(sizes, value=sizes[0], label="size (height x width)",
                                       elem_id="gen-size")] if len(sizes) > 1 else []
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
            if prompt_examples:
                gr.Examples([[p] for p in prompt_examples], inputs=[prompt], label="examples")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="images", columns=4, height=360, object_fit="contain",
                                 elem_id="gen-gallery", format="png")
    inputs = [prompt, cfg, n_steps, seed, count] + size_choice
    button.click(h.generate, inputs, gallery, api_name="generate", concurrency_id="model")
    prompt.submit(h.generate, inputs, gallery, api_visibility="private", concurrency_id="model")


def _edit_tab(h: _Handlers, max_prompt_chars: int, max_steps: int) -> None:
    """The Edit tab: input image, instruction, the two guidance scales, steps, seed; endpoint ``/edit``."""
    defaults = h.pipe.generation_config
    head_steps = next((s.head.get("num_inference_steps") for s in h.pipe.model.config.modalities.values()), 50)
    steps = int(defaults.num_inference_steps or head_steps or 50)
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Image(type="filepath", label="image to edit", elem_id="edit-image", height=240)
            instruction = gr.Textbox(label="instruction", max_length=max_prompt_chars, elem_id="edit-prompt",
                                     placeholder="make the circle blue")
            cfg = gr.Slider(1.0, 10.0, value=defaults.guidance_scale, step=0.5, label="text guidance scale")
            img_cfg = gr.Slider(1.0, 5.0, value=defaults.image_guidance_scale or 1.5, step=0.1,
                                label="image guidance scale", info="higher: closer to the input image")
            n_steps = gr.Slider(1, max_steps, value=min(steps, max_steps), step=1, label="inference steps")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
            button = gr.Button("Edit", variant="primary", elem_id="edit-button")
        with gr.Column(scale=3):
            result = gr.Image(label="edited image", elem_id="edit-result", format="png", height=360)
    inputs = [source, instruction, cfg, img_cfg, n_steps, seed]
    button.click(h.edit, inputs, result, api_name="edit", concurrency_id="model")
    instruction.submit(h.edit, inputs, result, api_visibility="private", concurrency_id="model")


def build_demo(pipe: MMARPipeline, *, max_new_tokens: int = 64, max_prompt_chars: int = 500, max_images: int = 8,
               max_steps: int = 100, queue_size: int = 16, chat_memory: bool = False,
               chat_examples: list[dict] | None = None, prompt_examples: list[str] | None = None,
               title: str = "mmar", max_context_tokens: int | None = None) -> gr.Blocks:
    """The demo app for one pipeline; limits are enforced server-side (``max_context_tokens``: a remembered
    conversation's length, default ``MAX_CONTEXT_TOKENS``, never more than the backbone's positions).
    Launch it with :func:`launch`."""
    h = _Handlers(pipe, max_new_tokens, max_prompt_chars, max_images, max_context_tokens)
    limits = dict(max_new_tokens=max_new_tokens, prompt_characters=max_prompt_chars, images_per_request=max_images,
                  upload_size=MAX_FILE_SIZE, queue_size=queue_size, remembered_messages=MAX_HISTORY_MESSAGES,
                  remembered_tokens=h.max_context_tokens)
    with gr.Blocks(title=f"{title} demo") as demo:
        gr.Markdown(f"# {title}\nOne causal backbone reads and writes interleaved text and images: an LM head "
                    "predicts text, a diffusion head predicts each image token.")
        with gr.Tab("Chat"):
            _chat_tab(h, max_new_tokens, chat_memory, chat_examples)
        with gr.Tab("Generate", visible=Image.modality in pipe.modalities):
            _generate_tab(h, max_prompt_chars, max_steps, max_images, prompt_examples)
        with gr.Tab("Edit", visible=Image.modality in pipe.modalities):
            _edit_tab(h, max_prompt_chars, max_steps)
        with gr.Tab("Model"):
            gr.Markdown(model_summary(pipe, limits), elem_id="model-info")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def is_loopback(host: str | None) -> bool:
    """True when ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in (None, "localhost"):
        return host is not None
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume others can reach it
        return False


def exposure_warning(host: str | None, share: bool, auth: Any) -> str | None:
    """The warning for a demo others can reach (a non-loopback host, or a share link) without a login."""
    if auth or (is_loopback(host) and not share):
        return None
    where = "a public gradio.live link" if share else f"{host or 'every interface'}"
    return (f"warning: the demo is served on {where} without a login: anyone who can reach it can use the "
            "model (and its CPU / GPU time); pass --auth user:password (launch(..., auth=(user, password))).")


def launch(demo: gr.Blocks, host: str | None = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: tuple[str, str] | None = None, **kwargs: Any):
    """Serve the demo: binds ``host`` (this machine only by default), caps uploads at ``MAX_FILE_SIZE``;
    ``auth`` = (user, password) asks for a login (gradio's ``auth``). Serving a non-loopback host or a
    share link without ``auth`` prints a warning."""
    warning = exposure_warning(host, share, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return demo.launch(server_name=host, server_port=port, share=share, auth=auth, max_file_size=MAX_FILE_SIZE,
                       show_error=True, css=CSS, **kwargs)


def digits_examples(folder: str | None = None, count: int = 2) -> tuple[list[dict], list[str]]:
    """Examples for the built-in digits model: chat messages (with held-out digit images) and prompts."""
    from ..data.digits import load_digit_split

    if folder is None:
        folder = tempfile.mkdtemp(prefix="mmar-examples-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # ours: gone when the demo's process ends
    x, _ = load_digit_split("test")
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"digit{i}.png"))
        PILImage.fromarray(x[i]).resize((128, 128), PILImage.NEAREST).save(paths[-1])
    chat = [{"text": "draw the digit seven", "files": []}, {"text": "a 3 and then a 4:", "files": []}]
    chat += [{"text": "which digit is this?", "files": [p]} for p in paths]
    return chat, ["draw the digit seven", "a handwritten 3", "show me a five", "write the number nine"]
