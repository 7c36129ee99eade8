"""Evaluate a model on a user's own held-out chat records (``mmar eval --task jsonl --data_files F``).

Each record's last assistant message is the reference answer; the messages before it are the prompt.

* text answers: greedy replies scored by exact match and by "contains" (the reference appears in the
  reply), both after normalising case, whitespace and trailing punctuation;
* the loss of the reference answers (text cross-entropy and each head's loss), as in training;
* image answers: one image generated per prompt and the Fréchet distance between the generated and the
  reference images, in a feature space fitted here (pixels at 16x16, projected on the references'
  principal components), with the pixel MSE to each prompt's own reference.

:func:`mean_losses` and :func:`text_accuracy` are also what the trainer's held-out evaluation uses.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from ..types import Image, Message, Text

FD_SIZE = 16  # images are compared at FD_SIZE x FD_SIZE pixels
FD_MAX_DIM = 16  # principal components kept (and at most n_references - 1)
MAX_SHOWN = 20  # answers listed in the metrics


def normalize(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?")


def split_answer(messages: list[Message]) -> tuple[list[Message], list[Any]]:
    """(the prompt: messages before the last assistant message, the reference: that message's segments)."""
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    if last == 0 or messages[last - 1].role != "user":
        raise ValueError("the last assistant message must follow a user message")
    return messages[:last], list(messages[last].content)


def _text_of(segments: list[Any]) -> str:
    return "".join(s.text if isinstance(s, Text) else s for s in segments if isinstance(s, (str, Text)))


def _images_of(segments: list[Any]) -> list[Any]:
    return [s for s in segments if isinstance(s, (Image, PILImage.Image))]


def score_text(prediction: str, reference: str) -> tuple[bool, bool]:
    """(exact match, reference contained in the prediction), after :func:`normalize`."""
    p, r = normalize(prediction), normalize(reference)
    return p == r, bool(r) and r in p


@torch.no_grad()
def mean_losses(model, batches, device=None) -> dict[str, float]:
    """The losses over ``batches`` (processor / collator outputs), each batch weighted by its rows."""
    was_training, sums, rows = model.training, {}, 0
    model.eval()
    for batch in batches:
        if batch is None:
            continue
        batch = {k: v for k, v in batch.items() if k not in ("seq_lens", "sample_index")}
        if device is not None:
            batch = {k: ({m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v.to(device))
                     for k, v in batch.items()}
        out = model(**batch)
        n = batch["input_ids"].shape[0]
        parts = {"loss": out.loss, "text_loss": out.text_loss,
                 **{f"{m}_loss": v for m, v in (out.modality_losses or {}).items()}}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        rows += n
    model.train(was_training)
    return {k: v / rows for k, v in sums.items()} if rows else {}


def text_accuracy(pipe, records: list[tuple[list[Message], str]], batch_size: int = 16,
                  max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy replies to ``(prompt messages, reference text)`` pairs: exact-match and contains accuracy."""
    exact = contains = 0
    answers = []
    for at in range(0, len(records), batch_size):
        chunk = records[at:at + batch_size]
        out = pipe([p for p, _ in chunk], mode="text", temperature=0.0, max_new_tokens=max_new_tokens)
        for (_, ref), pred in zip(chunk, out.text):
            e, c = score_text(pred, ref)
            exact, contains = exact + e, contains + c
            answers.append({"reference": ref, "prediction": pred, "exact": e})
    n = max(len(records), 1)
    return {"n_text": len(records), "exact_match": exact / n, "contains": contains / n,
            "answers": answers[:MAX_SHOWN]}


def _features(images: list, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    return np.stack([np.asarray(im.convert(mode).resize((FD_SIZE, FD_SIZE), PILImage.BILINEAR),
                                dtype=np.float64).reshape(-1) / 255.0 for im in images])


def image_scores(generated: list, references: list) -> dict[str, Any]:
    """Fréchet distance (pixels on the references' principal components) and the mean pixel MSE."""
    from .digits import frechet_distance

    channels = 1 if all(im.mode in ("L", "1", "I", "I;16") for im in references) else 3
    gen, ref = _features(generated, channels), _features(references, channels)
    out: dict[str, Any] = {"n_images": len(references), "image_mse": float(((gen - ref) ** 2).mean())}
    k = min(FD_MAX_DIM, len(references) - 1, ref.shape[1])
    if k < 1:
        return {**out, "frechet_distance": None}
    mean = ref.mean(0)
    basis = np.linalg.svd(ref - mean, full_matrices=False)[2][:k].T
    out["frechet_distance"] = frechet_distance((gen - mean) @ basis, (ref - mean) @ basis)
    out["fd_features"] = f"pixels {FD_SIZE}x{FD_SIZE}, {k} principal components of the references"
    return out


def _read(data_files, max_samples: int | None):
    from ..data.jsonl import ChatDataset

    ds = ChatDataset(data_files, split="eval")
    samples, bad = [], []
    for i in range(len(ds) if max_samples is None else min(len(ds), max_samples)):
        try:
            messages = ds[i]
            samples.append((messages, *split_answer(messages)))
        except (ValueError, TypeError, OSError) as e:
            bad.append(str(e))
    if not samples:
        raise ValueError(f"{data_files}: no readable record with an assistant answer"
                         + (f" (e.g. {bad[0]})" if bad else ""))
    return samples, bad


def evaluate_jsonl(model_dir: str, data_files: str | list[str] | None = None, output: str | None = None,
                   grid: str | None = None, guidance_scale: float | None = None,
                   image_temperature: float | None = None, num_inference_steps: int | None = None,
                   seed: int = 0, max_samples: int | None = None, batch_size: int = 16,
                   pipeline=None) -> dict[str, Any]:
    from ..pipeline import MMARPipeline

    if not data_files:
        raise ValueError("--task jsonl needs --data_files: a JSONL of chat records with reference answers")
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    samples, bad = _read(data_files, max_samples)
    batches = (pipe.processor([s for s, _, _ in samples[at:at + batch_size]])
               for at in range(0, len(samples), batch_size))
    metrics: dict[str, Any] = {"task": "jsonl", "model": str(model_dir), "data_files": data_files,
                               "n_records": len(samples), "bad_records": len(bad),
                               **mean_losses(pipe.model, batches, device=pipe.device)}
    texts = [(p, _text_of(ref)) for _, p, ref in samples if not _images_of(ref) and _text_of(ref).strip()]
    if texts:
        metrics.update(text_accuracy(pipe, texts, batch_size))
    pairs = [(p, _images_of(ref)[0]) for _, p, ref in samples if _images_of(ref)]
    if pairs:
        generated = []
        for at in range(0, len(pairs), batch_size):
            chunk = pairs[at:at + batch_size]
            out = pipe([p for p, _ in chunk], mode="image", max_items=1, guidance_scale=guidance_scale,
                       image_temperature=image_temperature, num_inference_steps=num_inference_steps,
                       generator=[torch.Generator().manual_seed(seed + at + i) for i in range(len(chunk))])
            generated += [row[0] for row in out.images]
        references = [pipe.load_image(ref.image) for _, ref in pairs]
        metrics.update(image_scores(generated, references))
        if grid or output:
            from ..training.pictures import image_grid

            grid = grid or os.path.splitext(output)[0] + "_grid.png"
            shown = min(len(pairs), 16)  # references on top, generated below
            image_grid(references[:shown] + generated[:shown], cols=shown, scale=4).save(grid)
            metrics["grid"] = grid
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
