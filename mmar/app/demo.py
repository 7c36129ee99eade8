"""The Gradio demo: ``build_demo(pipeline) -> gr.Blocks`` and ``launch(demo)``.

Tabs: **Chat** (text + image uploads, streamed replies, generated images inline), **Generate**
(text-to-image with guidance scale, steps, seed and number of images) and **Model** (config summary,
parameter count, limits). Endpoints for ``gradio_client``: ``/chat`` and ``/generate``.
All events share one concurrency slot, so one request runs at a time (the model is shared); the queue
is bounded.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from typing import Any

import gradio as gr
import torch
from PIL import Image as PILImage

from ..io import is_audio_file, save_wav
from ..pipeline import MMARPipeline
from ..types import TEXT, Audio, Image, Item, Message, modality_of_file, parse_part

MAX_FILE_SIZE = "2mb"  # per upload
MAX_UPLOADS = 4  # files per chat message
MAX_HISTORY_MESSAGES = 32  # with memory on: earlier messages sent back to the model, at most ...
MAX_HISTORY_FILES = 16  # ... holding at most this many files (and 32 prompts' worth of text)
MAX_SEED = 2**32 - 1
DISPLAY_SIZE = 160  # generated images are shown scaled up (nearest neighbour) to at least this many pixels
NO_REPLY = "(no reply)"  # shown when the model stops at once; never sent back to it
CSS = "#gen-gallery img, .message img { image-rendering: pixelated; }"


def _display(img: PILImage.Image, folder: str) -> str:
    """Scale a small image up for display (pixel-exact) and save it as a PNG; returns the path."""
    factor = max(1, math.ceil(DISPLAY_SIZE / max(img.size)))
    path = os.path.join(folder, f"{uuid.uuid4().hex[:12]}.png")
    img.resize((img.width * factor, img.height * factor), PILImage.NEAREST).save(path)
    return path


def model_summary(pipe: MMARPipeline, limits: dict[str, Any] | None = None) -> str:
    """Markdown: where the model comes from, its size, backbone, modalities and generation defaults."""
    cfg, model = pipe.model.config, pipe.model
    bb = cfg.backbone_config
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    lines = [f"**Model directory:** `{model.name_or_path}`  ",
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
    gen = ", ".join(f"{k.replace('_', ' ')} {'(head default)' if v is None else v}"
                    for k, v in vars(pipe.generation_config).items())
    lines += ["", f"**Generation defaults:** {gen}"]
    if limits:
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in limits.items())
        lines.append(f"  \n**Limits of this demo:** {shown}")
    return "\n".join(lines)


class _Handlers:
    """The event functions, bound to one pipeline and the demo's limits."""

    def __init__(self, pipe: MMARPipeline, max_new_tokens: int, max_prompt_chars: int, max_images: int):
        self.pipe, self.max_new_tokens = pipe, max_new_tokens
        self.max_prompt_chars, self.max_images = max_prompt_chars, max_images
        self.folder = tempfile.mkdtemp(prefix="mmar-demo-")

    def _check_prompt(self, text: str) -> str:
        text = (text or "").strip()
        if len(text) > self.max_prompt_chars:
            raise gr.Error(f"The prompt is {len(text)} characters long; "
                           f"this demo takes at most {self.max_prompt_chars}.")
        return text

    def _check_history(self, history: list[dict]) -> None:
        """With memory on the earlier turns go to the model too: bound them as the new message is bounded."""
        chars = files = 0
        for msg in history:
            content = msg.get("content")
            for part in content if isinstance(content, list) else [content]:
                if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"):
                    chars += len(part if isinstance(part, str) else part.get("text") or "")
                elif part is not None:
                    files += 1
        max_chars = MAX_HISTORY_MESSAGES * self.max_prompt_chars
        if len(history) > MAX_HISTORY_MESSAGES or chars > max_chars or files > MAX_HISTORY_FILES:
            raise gr.Error(f"The conversation is too long to remember ({len(history)} messages, {chars} characters, "
                           f"{files} files; this demo takes at most {MAX_HISTORY_MESSAGES}, {max_chars} and "
                           f"{MAX_HISTORY_FILES}). Press Clear, or turn off 'remember earlier turns'.")

    def _load(self, modality: str, raw: Any, name: str) -> Item:
        """An input item, checked against the model and fitted to it (:meth:`MMARPipeline.load`)."""
        try:
            return self.pipe.load(modality, raw)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise gr.Error(f"Cannot use {name}: {e}") from e

    def _upload(self, path: str) -> Item:
        """An uploaded file as a segment of the modality its type says (images fitted to the model)."""
        try:
            modality = modality_of_file(path)
        except ValueError as e:
            raise gr.Error(f"Cannot use {os.path.basename(path)}: {e}") from e
        return self._load(modality, path, os.path.basename(path))

    def _show(self, item: Any) -> dict:
        """A segment (uploaded or generated) as a Chatbot file message."""
        if isinstance(item, Audio):
            path = item.waveform if isinstance(item.waveform, str) else save_wav(
                item, os.path.join(self.folder, f"{uuid.uuid4().hex[:12]}.wav"))
            return {"path": path, "alt_text": "audio"}
        return {"path": _display(item.image if isinstance(item, Image) else item, self.folder), "alt_text": "image"}

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
        uploads = [self._upload(f) for f in files]
        if memory:
            self._check_history(history)
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

    def generate(self, prompt: str, guidance_scale: float, num_inference_steps: float, seed: float,
                 num_images: float, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's idiom
        """Text-to-image: ``num_images`` images, image i drawn with seed ``seed + i``."""
        prompt = self._check_prompt(prompt)
        if not prompt:
            raise gr.Error("Type a prompt first.")
        n = max(1, min(int(num_images), self.max_images))
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise gr.Error(f"The seed must be between 0 and {MAX_SEED}, got {seed}.")
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        try:
            out = self.pipe([prompt] * n, mode="image", max_items=1, guidance_scale=guidance_scale,
                            num_inference_steps=int(num_inference_steps), generator=gens)
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e)) from e
        return [(_display(imgs[0], self.folder), f"seed {seed + i}") for i, imgs in enumerate(out.images) if imgs]


def build_demo(pipe: MMARPipeline, *, max_new_tokens: int = 64, max_prompt_chars: int = 500, max_images: int = 8,
               max_steps: int = 100, queue_size: int = 16, chat_memory: bool = False,
               chat_examples: list[dict] | None = None,
               prompt_examples: list[str] | None = None, title: str = "mmar") -> gr.Blocks:
    """The demo app for one pipeline; limits are enforced server-side. Launch it with :func:`launch`."""
    h = _Handlers(pipe, max_new_tokens, max_prompt_chars, max_images)
    defaults = pipe.generation_config
    modalities = pipe.processor.modality_tokenizers
    has_images, has_audio = "image" in modalities, "audio" in modalities
    head_steps = next((s.head.get("num_inference_steps") for s in pipe.model.config.modalities.values()), 50)
    steps = int(defaults.num_inference_steps or head_steps or 50)
    limits = dict(max_new_tokens=max_new_tokens, prompt_characters=max_prompt_chars, images_per_request=max_images,
                  upload_size=MAX_FILE_SIZE, queue_size=queue_size, remembered_messages=MAX_HISTORY_MESSAGES)
    with gr.Blocks(title=f"{title} demo") as demo:
        gr.Markdown(f"# {title}\nOne causal backbone reads and writes interleaved text and images: an LM head "
                    "predicts text, a diffusion head predicts each image token.")
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="conversation", height=440, elem_id="chatbot",
                                 placeholder="Ask for a drawing, or upload an image and ask about it.")
            kinds = [k for k, ok in (("image", has_images), ("audio", has_audio)) if ok]
            hint = f"; attach {' or '.join(kinds)} files with the clip button" if kinds else ""
            box = gr.MultimodalTextbox(placeholder="Type a message" + hint, file_types=kinds, file_count="multiple",
                                       sources=["upload", "microphone"] if has_audio else ["upload"],
                                       show_label=False, elem_id="chat-input")
            with gr.Accordion("Sampling settings", open=False):
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="temperature (0 = greedy)")
                chat_tokens = gr.Slider(1, max_new_tokens, value=min(defaults.max_new_tokens, max_new_tokens), step=1,
                                        label="max new tokens")
                chat_cfg = gr.Slider(1.0, 10.0, value=defaults.guidance_scale, step=0.5,
                                     label="guidance scale (images)")
                memory = gr.Checkbox(value=chat_memory, label="remember earlier turns",
                                     info="send the whole conversation to the model; models trained on single "
                                          "turns (like the built-in digits model) answer best with this off")
            if chat_examples:
                gr.Examples(chat_examples, inputs=[box], label="examples")
            box.submit(h.chat, [box, chatbot, temperature, chat_tokens, chat_cfg, memory], [chatbot, box],
                       api_name="chat", concurrency_id="model")
            gr.ClearButton([chatbot, box], value="Clear")
        with gr.Tab("Generate", visible=has_images):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="prompt", max_length=max_prompt_chars, elem_id="gen-prompt",
                                        placeholder="draw the digit seven")
                    cfg = gr.Slider(1.0, 10.0, value=defaults.guidance_scale, step=0.5, label="guidance scale")
                    n_steps = gr.Slider(1, max_steps, value=min(steps, max_steps), step=1, label="inference steps")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                        count = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="number of images")
                    button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                    if prompt_examples:
                        gr.Examples([[p] for p in prompt_examples], inputs=[prompt], label="examples")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="images", columns=4, height=360, object_fit="contain",
                                         elem_id="gen-gallery", format="png")
            inputs = [prompt, cfg, n_steps, seed, count]
            button.click(h.generate, inputs, gallery, api_name="generate", concurrency_id="model")
            prompt.submit(h.generate, inputs, gallery, api_visibility="private", concurrency_id="model")
        with gr.Tab("Model"):
            gr.Markdown(model_summary(pipe, limits), elem_id="model-info")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, host: str | None = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs: Any):
    """Serve the demo: binds ``host`` (this machine only by default), caps uploads at ``MAX_FILE_SIZE``."""
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                       show_error=True, css=CSS, **kwargs)


def digits_examples(folder: str | None = None, count: int = 2) -> tuple[list[dict], list[str]]:
    """Examples for the built-in digits model: chat messages (with held-out digit images) and prompts."""
    from ..data.digits import load_digit_split

    folder = folder or tempfile.mkdtemp(prefix="mmar-examples-")
    x, _ = load_digit_split("test")
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"digit{i}.png"))
        PILImage.fromarray(x[i]).resize((128, 128), PILImage.NEAREST).save(paths[-1])
    chat = [{"text": "draw the digit seven", "files": []}, {"text": "a 3 and then a 4:", "files": []}]
    chat += [{"text": "which digit is this?", "files": [p]} for p in paths]
    return chat, ["draw the digit seven", "a handwritten 3", "show me a five", "write the number nine"]
