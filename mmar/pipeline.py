"""MMARPipeline: load a model directory and generate interleaved text / images (diffusers-style).

``pipe(prompt)`` returns an :class:`MMARPipelineOutput`; ``pipe.stream(prompt)`` yields text pieces and
finished images as they come; ``pipe.chat(history)`` answers the last user message of a conversation.
Sampling defaults live in :class:`GenerationDefaults`, saved as ``generation_config.json`` next to the model.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from .adapters import LoraLoaderMixin, is_adapter_dir, load_adapter_pipeline
from .generation import DEFAULT_GUIDANCE, GENERATION_CONFIG_NAME, GenerationDefaults, generate  # noqa: F401 (re-exported)
from .generation.speculative import layer_draft, speculative_generate
from .io import convert_image, pixel_limit
from .io import load_image as _open_image
from .limits import InputLimits
from .modeling import MMARModel
from .sequence import MMARProcessor
from .types import (Audio, Image, Item, Message, Text, as_messages, modality_of, parse_message,  # noqa: F401
                    parse_part, segment_class)

__all__ = ["GENERATION_CONFIG_NAME", "GenerationDefaults", "MMARPipeline", "MMARPipelineOutput"]


@dataclass
class MMARPipelineOutput:
    """One entry per prompt: its segments in order (``str`` / PIL image / :class:`Audio`), and views by kind."""

    segments: list[list[Any]] = field(default_factory=list)
    latents: list[list[tuple[str, torch.Tensor]]] = field(default_factory=list)
    stats: Any = None  # speculative decoding's SpeculativeStats (``draft=``), else None

    @property
    def text(self) -> list[str]:
        return ["".join(s for s in row if isinstance(s, str)) for row in self.segments]

    def items(self, modality: str) -> list[list[Any]]:
        """Per prompt, its outputs of ``modality`` (decoded items, or ``(modality, latents)`` pairs)."""
        return [[s for s in row if modality_of(s) == modality] for row in self.segments]

    @property
    def images(self) -> list[list[Any]]:
        return self.items(Image.modality)

    @property
    def audios(self) -> list[list[Any]]:
        return self.items(Audio.modality)


class _TextStream:
    """Incremental detokenizer: decode the whole text run, emit only what is new and complete
    (a trailing U+FFFD means a multi-byte character is still missing bytes)."""

    def __init__(self, decode):
        self.decode, self.ids, self.sent = decode, [], ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids) if self.ids else ""
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.ids, self.sent = [], ""
        return piece


@dataclass
class _Request:
    """One call's prepared inputs: the prompts, the media of each, the mode and the settings."""

    prompts: list
    media: list[list]
    mode: str
    generator: Any
    settings: GenerationDefaults
    size: tuple[int, int] | None = None  # (height, width) of the images drawn; None: the model's choice


class _Cancelled(Exception):
    """Raised inside the sampler's callback when the consumer of :meth:`MMARPipeline.stream` went away."""


class MMARPipeline(LoraLoaderMixin):
    def __init__(self, model: MMARModel, processor: MMARProcessor, generation_config: GenerationDefaults | None = None):
        self.model, self.processor = model.eval(), processor
        self.generation_config = generation_config or GenerationDefaults.for_model(model.config)
        self.progress = True
        self._lock = threading.Lock()  # one generation at a time: the heads' schedulers keep state

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, quantization=None) -> MMARPipeline:
        """``quantization``: ``"int8"`` for int8 weight-only inference of the backbone (``"int4"``, or any
        transformers quantization config, see mmar/quantization.py); the heads stay in ``dtype``."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such model directory")
        if is_adapter_dir(directory):  # a LoRA run's output: its base + the adapter (mmar/adapters.py)
            if quantization is not None:
                raise ValueError(f"{directory}: an adapter directory; quantization applies to a model directory "
                                 "(merge the adapter first: mmar merge-lora)")
            return load_adapter_pipeline(cls, directory, device, dtype if not isinstance(dtype, str)
                                         else getattr(torch, dtype))
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory}: not a model directory (no config.json or adapter_config.json; train one with `mmar train`)")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if quantization is not None:
            from .quantization import load_quantized

            model = load_quantized(directory, quantization, dtype=dtype, device_map=str(torch.device(device)))
        else:
            model = MMARModel.from_pretrained(directory, dtype=dtype).to(device)
        defaults = GenerationDefaults.from_pretrained(directory, GenerationDefaults.for_model(model.config))
        return cls(model, MMARProcessor.from_pretrained(directory), defaults)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        if self._peft is not None:  # adapters loaded: write the active one as an adapter directory
            return self.save_lora_weights(directory)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs --------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """The modalities this model reads, from its config (in its order); text is always there too."""
        return list(self.model.config.modalities)

    def load(self, modality: str, raw: Any) -> Item:
        """One input item for the front doors (a path or an object), checked now with a clear error naming
        the file: the model must take ``modality`` and its tokenizer must read the item; images are opened
        and fitted to the tokenizer (:meth:`load_image`)."""
        cls = segment_class(modality)
        if cls is Image:
            return Image(self.load_image(raw))
        where = f"{os.fspath(raw)}: " if isinstance(raw, (str, os.PathLike)) else ""
        if modality not in self.processor.modality_tokenizers:
            handles = ", ".join(self.processor.modality_tokenizers) or "text only"
            raise ValueError(f"{where}this model has no {modality} tokenizer (it handles {handles})")
        if where and not os.path.isfile(raw):
            raise FileNotFoundError(f"{where}{modality} file not found")
        item = cls.from_value(raw)
        self.processor.modality_tokenizers[modality].preprocess(item.raw())  # reads and checks it now
        return item

    def load_image(self, raw: Any) -> PILImage.Image:
        """Open a path / PIL image / uint8 array and fit it to the image tokenizer, for front doors that
        take any upload: its colour mode, and a size the model was trained on (the one nearest in aspect
        ratio; resized, and padded with black where the aspect ratio differs, never stretched or
        cropped; a warning says what was done). Bad files raise a clear error."""
        tok = self.processor.modality_tokenizers.get(Image.modality)
        if tok is None:
            raise ValueError("this model takes no images; it handles "
                             f"{', '.join(self.processor.modality_tokenizers) or 'text only'}")
        side = max((max(s) for s in self.image_sizes()), default=None)  # the longest trained side
        mode = "L" if getattr(tok, "channels", 3) == 1 else "RGB"
        img = _open_image(raw, mode=mode, max_pixels=pixel_limit(side))  # limits, EXIF, 16-bit, alpha
        if isinstance(img, np.ndarray):
            try:
                img = convert_image(PILImage.fromarray(img), mode)
            except TypeError as e:
                raise TypeError(f"cannot read an image from an array of shape {img.shape} and dtype {img.dtype}") from e
        if not isinstance(img, PILImage.Image):
            raise TypeError(f"cannot read an image from {type(img).__name__}; give a path, a PIL image or an array")
        if hasattr(tok, "fit_to_size"):
            img, note = tok.fit_to_size(img)
            if note:
                warnings.warn(f"{note}; this model was trained on {self._sizes_text()}", stacklevel=2)
        return img

    def image_sizes(self) -> list[tuple[int, int]]:
        """The ``(height, width)`` sizes the model's image tokenizer was trained on, the default first."""
        tok = self.processor.modality_tokenizers.get(Image.modality)
        return [tuple(s) for s in getattr(tok, "sizes", None) or []]

    def _sizes_text(self) -> str:
        return ", ".join(f"{h}x{w}" for h, w in self.image_sizes()) + " (height x width)"

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int] | None:
        """The trained size that ``height`` / ``width`` ask for (either may be left out when the other
        picks one size), ``None`` when both are left out; a clear error for a size not trained on."""
        if height is None and width is None:
            return None
        sizes = self.image_sizes()
        if not sizes:
            raise ValueError("height= / width= need a model that draws images")
        match = [s for s in sizes if height in (None, s[0]) and width in (None, s[1])]
        if len(match) != 1:
            asked = f"height={height}, width={width}"
            raise ValueError(f"{asked}: this model draws images of {self._sizes_text()}" +
                             ("; give both height and width" if match else ""))
        return match[0]

    def _prompt(self, prompt: Any, media: list | None) -> list[Message]:
        if isinstance(prompt, str):
            if not prompt.strip() and not media:
                raise ValueError("empty prompt: give some text, an image or an audio clip")
            return [Message("user", list(media or []) + ([prompt] if prompt.strip() else []))]
        if media:
            raise ValueError("images= / audio= / media= go with a string prompt; put them in the messages of a "
                             "conversation")
        return self.messages(prompt)

    @staticmethod
    def _media(images, audio, media: dict | None) -> dict[str, Any]:
        """``media={modality: items}`` with ``images=`` / ``audio=`` as shortcuts: those first, then the rest."""
        shortcuts = {m: v for m, v in ((Image.modality, images), (Audio.modality, audio)) if v is not None}
        twice = sorted(set(shortcuts) & set(media or {}))
        if twice:
            raise ValueError(f"{twice[0]} given twice: as a keyword and in media=")
        return {**shortcuts, **(media or {})}

    @staticmethod
    def _media_lists(prompts: list, batch: bool, media: dict[str, Any]) -> list[list]:
        """Per prompt, the segments that go before its text, modality by modality in ``media``'s order: its
        items of each (a path or an item; an audio clip may be an :class:`Audio` or a ``(waveform,
        sampling_rate)`` pair)."""
        out = [[] for _ in prompts]
        for modality, items in media.items():
            cls = segment_class(modality)
            lists = items if batch else [items]
            if len(lists) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(lists)} {modality} lists")
            for row, x in zip(out, lists):
                row += [cls.from_value(v) for v in x or []]
        return out

    @staticmethod
    def messages(history: Any) -> list[Message]:
        """Normalise a conversation: :class:`Message` objects or ``{"role", "content"}`` dicts whose content
        is a string, a segment, a PIL image, or a list of those and of typed parts
        (``{"type": "text", "text"}``, ``{"type": "image", "image" | "path"}``) as in chat templates
        (read by :func:`mmar.types.parse_message`)."""
        if isinstance(history, (Message, dict)):
            history = [history]
        if not isinstance(history, (list, tuple)) or not history:
            raise ValueError("a conversation must be a non-empty list of messages")
        if not all(isinstance(m, (Message, dict)) for m in history):
            return as_messages(history)
        return [parse_message(m) for m in history]

    # -- generation ----------------------------------------------------------------------------
    def _request(self, prompt: Any, media: dict, mode: str, generator, sampling: dict, *,
                 single: bool = False, size: tuple = (None, None)) -> _Request:
        """The preparation ``__call__`` and ``stream`` share: prompts, their media, validated settings."""
        batch = bool(isinstance(prompt, list) and prompt and not isinstance(prompt[0], (Message, dict)))
        if batch and single:
            raise ValueError("stream() takes one prompt; call the pipeline itself for a batch")
        prompts = prompt if batch else [prompt]
        settings = self.generation_config.replace(**sampling)  # None = the default; bad values raise here
        return _Request(prompts, self._media_lists(prompts, batch, media), mode, generator, settings,
                        self.image_size(*size))

    def _inputs(self, req: _Request):
        """The request's prompts encoded and collated on the model's device: ids, mask, values, sizes."""
        start = req.mode if req.mode in self.processor.modality_tokenizers else None
        start_size = req.size if start == Image.modality else None
        enc = [self._encode(self._prompt(p, media), start, req.mode, start_size)
               for p, media in zip(req.prompts, req.media)]
        # every image a row opens has the size asked for (models of several sizes)
        sizes = {Image.modality: req.size} if req.size is not None and Image.modality in self.processor.size_ids \
            else None
        b = self.processor.collate(enc, padding_side="left")
        dev = self.device
        values = {m: v.to(dev) for m, v in b["values"].items()}
        return b["input_ids"].to(dev), b["attention_mask"].to(dev), values, sizes

    def _run(self, req: _Request, callback=None):
        input_ids, attention_mask, values, sizes = self._inputs(req)
        with self._lock:
            return generate(self.model, input_ids, attention_mask, values, config=req.settings, decode_text=self.processor.decode_text, mode=req.mode,
                            generator=req.generator, suppress_ids=self.processor.tokenizer.all_special_ids,
                            eos_token_id=self.processor.stop_id, progress=self.progress, callback=callback,
                            sizes=sizes)

    def _run_speculative(self, req: _Request, draft, num_draft_tokens: int):
        """The item each prompt opens, by continuous speculative decoding (:mod:`mmar.generation.speculative`);
        ``draft``: a model sharing this one's tokenizers, or a layer count (the first layers of this model)."""
        if req.mode not in self.processor.modality_tokenizers:
            raise ValueError(f"draft= (speculative decoding) needs mode set to a modality, got mode={req.mode!r}")
        if isinstance(req.generator, (list, tuple)):
            raise ValueError("draft= takes one torch.Generator for the call, not a list")
        if isinstance(draft, int) and not isinstance(draft, bool):  # built per call: it follows adapters
            draft = layer_draft(self.model, draft)
        input_ids, attention_mask, values, sizes = self._inputs(req)
        if sizes:
            raise ValueError("draft= (speculative decoding) does not draw items of several sizes yet")
        s = req.settings
        with self._lock:
            return speculative_generate(self.model, draft, input_ids, attention_mask, values,
                                        num_draft_tokens=num_draft_tokens, guidance_scale=s.guidance_scale,
                                        image_temperature=s.image_temperature,
                                        num_inference_steps=s.num_inference_steps, generator=req.generator,
                                        eos_token_id=self.processor.stop_id, decode_text=self.processor.decode_text)

    @property
    def limits(self) -> InputLimits:
        """The model's input caps (positions, items), see :mod:`mmar.limits`."""
        if getattr(self, "_limits", None) is None:
            self._limits = InputLimits(self.processor, self.model.config)
        return self._limits

    def _encode(self, messages: list[Message], start: str | None, mode: str, start_size=None):
        """Encode one prompt within the backbone's positions: items and text are counted before anything
        is decoded or tokenized, the exact length after (a clear ValueError either way)."""
        self.limits.check_messages(messages)
        enc = self.processor.encode(messages, add_generation_prompt=True, start_modality=start,
                                    start_size=start_size)
        self.limits.check_length(len(enc), mode)
        return enc

    def _decode(self, item: tuple[str, torch.Tensor], output_type: str):
        if output_type == "latent":
            return item
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        return self.processor.decode_item(*item)

    @torch.no_grad()
    def __call__(self, prompt: Any, images: list | None = None, *, audio: list | None = None,
                 media: dict[str, list] | None = None, mode: str = "auto", generator=None, output_type: str = "pil",
                 height: int | None = None, width: int | None = None, draft: MMARModel | int | None = None,
                 num_draft_tokens: int = 4, **sampling) -> MMARPipelineOutput:
        """``prompt``: a string, a conversation (list of messages), or a list of those (a batch). ``images``:
        images that go before the text of a string prompt (one list per prompt in a batch). ``audio``:
        audio clips (paths, :class:`Audio`, or ``(waveform, sampling_rate)``) that go after the images,
        likewise. ``media``: ``{modality: items}`` for any modality of the model (``images`` and ``audio``
        are shortcuts for ``media={"image": ..., "audio": ...}``). ``mode``: ``"auto"``, ``"text"``, or a
        modality to open an item of at once. ``height`` / ``width``: the size of the images drawn, one of
        :meth:`image_sizes` (default: the model picks, or the only size it has). ``sampling``: any
        :class:`GenerationDefaults` setting (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
        ``guidance_scale``, ``image_temperature``, ``num_inference_steps``, ``max_items``, ...); those left
        out or ``None`` come from ``self.generation_config``. Editing: an input image in ``images``, the
        instruction as ``prompt``, ``mode="image"`` and ``image_guidance_scale`` (dual guidance, with
        ``guidance_scale`` for the instruction; see :mod:`mmar.generation.branches`). ``draft``: continuous
        speculative decoding of the item ``mode`` opens (a model with the same tokenizers, or ``L`` for this
        model's first ``L`` layers), ``num_draft_tokens`` proposed per target call; the output's ``stats``
        count the acceptances (:mod:`mmar.generation.speculative`)."""
        req = self._request(prompt, self._media(images, audio, media), mode, generator, sampling,
                            size=(height, width))
        out = self._run(req) if draft is None else self._run_speculative(req, draft, num_draft_tokens)
        segments = [[s if isinstance(s, str) else self._decode(s, output_type) for s in row] for row in out.segments]
        latents = [[s for s in row if not isinstance(s, str)] for row in out.segments]
        return MMARPipelineOutput(segments=segments, latents=latents, stats=out.stats)

    def stream(self, prompt: Any, images: list | None = None, *, audio: list | None = None,
               media: dict[str, list] | None = None, mode: str = "auto", generator=None, output_type: str = "pil",
               height: int | None = None, width: int | None = None, **sampling) -> Iterator[Any]:
        """Like ``__call__`` for one prompt, but yields text pieces (``str``) and finished images as the
        sampler produces them. Generation runs in a background thread; closing the iterator stops it."""
        req = self._request(prompt, self._media(images, audio, media), mode, generator, sampling, single=True,
                            size=(height, width))
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def callback(row: int, event: Any) -> None:
            if stop.is_set():
                raise _Cancelled
            events.put(("event", event))

        def work() -> None:
            try:
                with torch.no_grad():
                    self._run(req, callback=callback)
            except _Cancelled:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                events.put(("error", e))
            finally:
                events.put(("end", None))

        text = _TextStream(self.processor.decode_text)
        thread = threading.Thread(target=work, name="mmar-stream", daemon=True)
        thread.start()
        try:
            while True:
                kind, event = events.get()
                if kind == "error":
                    raise event
                if kind == "end":
                    break
                piece = text.add(event) if isinstance(event, int) else text.flush()
                if piece:
                    yield piece
                if isinstance(event, tuple):
                    yield self._decode(event, output_type)
        finally:
            stop.set()
            thread.join()

    def chat(self, history: Any, *, stream: bool = False, **kwargs) -> list[Any] | Iterator[Any]:
        """The assistant's reply to a conversation whose last message is the user's: its segments
        (``str`` / PIL image), or with ``stream=True`` an iterator of pieces as in :meth:`stream`."""
        messages = self.messages(history)
        if messages[-1].role != "user":
            raise ValueError(f"the last message must be the user's, got a {messages[-1].role!r} message")
        if stream:
            return self.stream(messages, **kwargs)
        return self(messages, **kwargs).segments[0]



def _segment(part: Any) -> Any:
    """One content part of a chat message -> a segment (kept for callers of the old name)."""
    return parse_part(part)
