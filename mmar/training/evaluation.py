"""Held-out evaluation while training: the eval loss every ``eval_steps``, the best weights, early stopping.

The held-out data is ``eval_data_files`` (chat records, like ``data_files``) or ``eval_split``: a fixed
slice of the training data drawn with ``seed`` and then left out of training (:func:`split_held_out`).

Each eval runs the model over every held-out sample without condition dropout, on every process
(:func:`eval_shards`: the same number of batches on each, so sharded models step together) and averages
over all of them: the loss over samples, the text loss over samples with text targets, each modality's
loss over samples with targets of that modality. A row ``{"step", "eval_loss", "eval_text_loss",
"eval_<modality>_loss", "train_loss", "best_eval_loss", "best_step", ...}`` goes to ``log.jsonl`` and the
tracker; ``train_loss`` is the mean training loss since the previous eval.

Overfitting warning (rule): when ``eval_loss > OVERFIT_RATIO * train_loss`` and ``train_loss <
OVERFIT_TRAIN_LOSS`` the training loss has fallen far below the held-out one, the model is memorising its
samples; the row says ``"overfitting": true`` and the first such eval warns.

With ``load_best_model_at_end`` each eval that lowers the best eval loss saves the model (as the final
save would: weights or adapter) into ``output_dir/best``, written into a temporary directory and
renamed; at the end its files become the final model (:func:`restore_best`). ``early_stopping_patience``
stops the run after that many evals in a row without a lower eval loss. The best record (step, loss,
evals without improvement) travels in each checkpoint's ``trainer_state.json``, so a resumed run
keeps it.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.registry import Collator, SafeDataset, build_dataset
from ..types import as_messages

OVERFIT_RATIO = 3.0  # eval loss this many times the training loss ...
OVERFIT_TRAIN_LOSS = 0.5  # ... while the training loss is below this: a warning
BEST = "best"  # output_dir/best: the weights of the best eval so far (with load_best_model_at_end)
BEST_RECORD = "best.json"


class Subset(Dataset):
    """Some samples of a dataset, by index; everything else (``texts``, ``preview_prompts``, ``epoch``)
    is the dataset's own."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int):
        return self.dataset[self.indices[idx]]

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def epoch(self):
        return self.dataset.epoch

    @epoch.setter
    def epoch(self, value):
        self.dataset.epoch = value

    def texts(self) -> list[str]:
        """The text of these samples where the dataset can say (a BPE is then fitted on the training
        part only), else all of the dataset's text."""
        if "indices" in inspect.signature(self.dataset.texts).parameters:
            return self.dataset.texts(indices=self.indices)
        return self.dataset.texts()


def split_held_out(dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(training part, held-out part): ``fraction`` of the samples drawn with ``seed``, each part in the
    dataset's order."""
    n = len(dataset)
    k = max(1, round(n * fraction))
    if k >= n:
        raise ValueError(f"eval_split={fraction}: holds out {k} of {n} samples, leaving none to train on")
    held = set(random.Random(f"mmar-eval-split-{seed}").sample(range(n), k))
    return (Subset(dataset, [i for i in range(n) if i not in held]),
            Subset(dataset, sorted(held)))


def check_eval_arguments(dargs, targs) -> None:
    """Clear errors for eval options that cannot work together, before anything is built."""
    if not 0.0 <= dargs.eval_split < 1.0:
        raise ValueError(f"eval_split={dargs.eval_split}: give a fraction in [0, 1), e.g. 0.1")
    has_eval = bool(dargs.eval_data_files) or dargs.eval_split > 0
    if dargs.eval_data_files and dargs.eval_split > 0:
        raise ValueError("give either eval_data_files or eval_split, not both")
    if dargs.eval_split > 0 and dargs.streaming:
        raise ValueError("eval_split: a streamed dataset cannot be split; give eval_data_files instead")
    for name in ("load_best_model_at_end", "early_stopping_patience", "eval_generate"):
        if getattr(targs, name) and not has_eval:
            raise ValueError(f"{name} needs held-out data: add --eval_data_files FILE or --eval_split 0.1")
    for name in ("eval_steps", "eval_batch_size", "eval_generate", "early_stopping_patience"):
        if getattr(targs, name) < 0:
            raise ValueError(f"{name}={getattr(targs, name)}: must be 0 or more")


def held_out_data(dataset, dargs, targs):
    """(the dataset to train on, the held-out dataset or None)."""
    check_eval_arguments(dargs, targs)
    if dargs.eval_split > 0:
        return split_held_out(dataset, dargs.eval_split, targs.seed)
    if dargs.eval_data_files:
        return dataset, build_dataset("jsonl", "eval", data_files=dargs.eval_data_files)
    return dataset, None


def eval_shards(n: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This process's eval batches (sample indices): global batches of ``batch_size * world`` samples
    dealt out in order; every process gets the same number of batches, an empty one where the samples ran
    out (it then runs a stand-in batch that weighs nothing)."""
    per_step = batch_size * world
    out = []
    for at in range(0, n, per_step):
        lo = min(at + rank * batch_size, n)
        out.append(list(range(lo, min(lo + batch_size, n))))
    return out


def _to(batch: dict, device) -> dict:
    return {k: ({m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items() if k not in ("seq_lens", "sample_index")}


def _weights(batch: dict, token_ids: dict, modalities: list[str]) -> list[float]:
    """Rows of the batch, rows with text targets, rows with targets of each modality."""
    nxt = batch["labels"][:, 1:]
    placeholders = torch.tensor([token_ids[m]["token"] for m in token_ids], device=nxt.device)
    text = ((nxt != -100) & ~torch.isin(nxt, placeholders)).any(1)
    mods = [(nxt == token_ids[m]["token"]).any(1) for m in modalities]
    return [float(nxt.shape[0]), float(text.sum()), *(float(m.sum()) for m in mods)]


@torch.no_grad()
def held_out_losses(acc, model, dataset, collator: Collator, batch_size: int) -> dict[str, float]:
    """The eval losses over every held-out sample, on every process together (summed, then divided)."""
    safe, proc = SafeDataset(dataset), collator.processor
    modalities = [m for m in proc.token_ids if m in proc.modality_tokenizers]
    sums = torch.zeros(2 * (2 + len(modalities)) + 1, dtype=torch.float64, device=acc.device)
    filler, skipped = None, collator.skipped
    was_training = model.training
    model.eval()
    for idx in eval_shards(len(dataset), batch_size, acc.num_processes, acc.process_index):
        batch = collator([safe[i] for i in idx]) if idx else None
        weight = 1.0
        if batch is None:  # no samples left here, or only bad ones: keep step with the other processes
            filler = filler or _stand_in(safe, collator)
            batch, weight = filler, 0.0
        batch = _to(batch, acc.device)
        out = model(**batch)
        parts = [out.loss, out.text_loss, *(out.modality_losses[m] for m in modalities)]
        for j, (v, w) in enumerate(zip(parts, _weights(batch, proc.token_ids, modalities))):
            sums[2 * j] += float(v) * w * weight
            sums[2 * j + 1] += w * weight
    model.train(was_training)
    sums[-1] = collator.skipped - skipped  # bad held-out records (skipped, as in training)
    sums = acc.reduce(sums, "sum").tolist()
    names = ["eval_loss", "eval_text_loss", *(f"eval_{m}_loss" for m in modalities)]
    out = {k: sums[2 * j] / sums[2 * j + 1] for j, k in enumerate(names) if sums[2 * j + 1] > 0}
    return {**out, "eval_bad_records": int(sums[-1])} if sums[-1] else out


def _stand_in(safe: SafeDataset, collator: Collator) -> dict:
    counted = collator.skipped, list(collator.reasons)  # a stand-in's search skips nothing of the eval's
    for i in range(len(safe)):
        batch = collator([safe[i]])
        if batch is not None:
            collator.skipped, collator.reasons = counted
            return batch
    raise ValueError(f"{getattr(safe.dataset, 'name', 'the held-out data')}: no readable held-out sample")


def answer_records(dataset, n: int) -> list[tuple[list, str]]:
    """The first ``n`` held-out samples whose reference (last assistant turn) is text:
    (prompt messages, reference text)."""
    from ..eval.jsonl import _images_of, _text_of, split_answer

    out = []
    for i in range(len(dataset)):
        if len(out) >= n:
            break
        try:
            prompt, ref = split_answer(as_messages(dataset[i]))
        except (ValueError, TypeError, KeyError, OSError):
            continue
        if not _images_of(ref) and _text_of(ref).strip() and all(isinstance(s, str) or hasattr(s, "text")
                                                                  for s in ref):
            out.append((prompt, _text_of(ref)))
    return out


def save_best(model, state, output_dir: str, record: dict) -> None:
    """Write ``model`` (with ``state``, from ``acc.get_state_dict`` on every process) as
    ``output_dir/best``, atomically: a temporary directory, then a rename. Main process only."""
    final, tmp = os.path.join(output_dir, BEST), os.path.join(output_dir, f".tmp_{BEST}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state)
    with open(os.path.join(tmp, BEST_RECORD), "w") as f:
        json.dump(record, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def restore_best(output_dir: str) -> dict | None:
    """Move the files of ``output_dir/best`` into ``output_dir`` (the final model); returns its record
    (step, eval loss), or None when there is no best directory."""
    best = os.path.join(output_dir, BEST)
    if not os.path.isfile(os.path.join(best, BEST_RECORD)):
        return None
    with open(os.path.join(best, BEST_RECORD)) as f:
        record = json.load(f)
    for name in os.listdir(best):
        if name == BEST_RECORD:
            continue
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(best, name), target)
    shutil.rmtree(best)
    return record


def overfitting(eval_loss: float, train_loss: float | None) -> bool:
    """The rule of the warning: the training loss small, and far below the eval loss."""
    return train_loss is not None and train_loss < OVERFIT_TRAIN_LOSS and eval_loss > OVERFIT_RATIO * train_loss


class Evaluator:
    """The held-out evaluation of one run: when to evaluate, the best eval so far, early stopping."""

    def __init__(self, dataset, collator: Collator, targs):
        self.dataset, self.collator, self.targs = dataset, collator, targs
        self.every = targs.eval_steps or targs.logging_steps
        self.batch_size = targs.eval_batch_size or targs.batch_size
        self.best_loss, self.best_step, self.bad_evals = math.inf, None, 0
        self.stop, self.warned, self.told_bad = False, False, False
        self.train_sum, self.train_n = 0.0, 0
        self.answers = answer_records(dataset, targs.eval_generate) if targs.eval_generate else []

    def observe(self, loss: torch.Tensor) -> None:
        """One step's training loss on this process (averaged over processes at the next eval)."""
        self.train_sum, self.train_n = self.train_sum + float(loss.detach()), self.train_n + 1

    def due(self, step: int) -> bool:
        """Whether ``step`` is an eval step (every ``eval_steps``, and the last)."""
        return step % self.every == 0 or step == self.targs.max_steps

    def state(self) -> dict:
        """What a checkpoint keeps (in its trainer_state.json)."""
        return {"best_step": self.best_step, "best_eval_loss": None if self.best_step is None else self.best_loss,
                "evals_without_improvement": self.bad_evals}

    def load_state(self, state: dict) -> None:
        """Take the best record back from a checkpoint's trainer state (:meth:`state`)."""
        if state.get("best_step") is not None:
            self.best_step, self.best_loss = state["best_step"], state["best_eval_loss"]
        self.bad_evals = state.get("evals_without_improvement", 0)

    def train_loss(self, acc) -> float | None:
        """The mean training loss since the last eval, over every process (a collective); then reset."""
        seen = acc.reduce(torch.tensor([self.train_sum, float(self.train_n)], dtype=torch.float64,
                                       device=acc.device), "sum").tolist()
        self.train_sum, self.train_n = 0.0, 0
        return seen[0] / seen[1] if seen[1] else None

    def judge(self, row: dict, step: int) -> bool:
        """Update the best record and the patience with one eval; True when it is the best so far."""
        better = row["eval_loss"] < self.best_loss
        if better:
            self.best_loss, self.best_step, self.bad_evals = row["eval_loss"], step, 0
        else:
            self.bad_evals += 1
        patience = self.targs.early_stopping_patience
        self.stop = bool(patience) and self.bad_evals >= patience
        row.update(best_eval_loss=self.best_loss, best_step=self.best_step)
        if overfitting(row["eval_loss"], row.get("train_loss")):
            row["overfitting"] = True
        if self.stop:
            row["early_stopping"] = f"{self.bad_evals} evals without a lower eval loss"
        return better


def make_evaluator(held_out, processor, targs) -> Evaluator | None:
    """The run's evaluator over ``held_out`` (None: no held-out data)."""
    if held_out is None:
        return None
    return Evaluator(held_out, Collator(processor, 0.0, seed=targs.seed), targs)


def held_out_answers(model, processor, records: list, batch_size: int) -> dict[str, float]:
    """Greedy answers to held-out questions: exact-match and contains accuracy (:mod:`mmar.eval.jsonl`)."""
    from ..eval.jsonl import text_accuracy
    from ..pipeline import MMARPipeline

    was_training = model.training
    pipe = MMARPipeline(model.eval(), processor)
    pipe.set_progress_bar_config(disable=True)
    longest = max(len(processor.tokenizer(ref).input_ids) for _, ref in records)
    scores = text_accuracy(pipe, records, batch_size=batch_size, max_new_tokens=longest + 4)
    model.train(was_training)
    return {"eval_exact_match": scores["exact_match"], "eval_contains": scores["contains"],
            "eval_answered": scores["n_text"]}


def run_eval(run, targs, whole: bool = True) -> dict:
    """One held-out evaluation of the run (every process calls it): losses, answers, the best record,
    the best weights, the log row, tracker, progress bar and a printed line. ``whole``: each process
    holds the whole model (not FSDP / ZeRO-3 shards), so the main one can answer questions alone."""
    acc, ev = run.acc, run.evaluator
    model = run.model if run.ema is None else run.ema.module  # with EMA: the weights that would be saved
    row = {"step": run.step, **held_out_losses(acc, model, ev.dataset, ev.collator, ev.batch_size),
           "train_loss": ev.train_loss(acc)}
    if ev.answers and acc.is_main_process and whole:
        plain = acc.unwrap_model(run.model) if run.ema is None else run.ema.module
        row.update(held_out_answers(plain, run.processor, ev.answers, ev.batch_size))
    if ev.judge(row, run.step) and targs.load_best_model_at_end:
        state = acc.get_state_dict(run.model) if run.ema is None else None  # a collective
        if acc.is_main_process:
            plain = acc.unwrap_model(run.model) if run.ema is None else run.ema.module
            save_best(plain, state, targs.output_dir, {"step": run.step, "eval_loss": row["eval_loss"]})
        acc.wait_for_everyone()
    report(run, row, targs)
    return row


def report(run, row: dict, targs) -> None:
    """The eval row in log.jsonl, the tracker, the progress bar's postfix and one printed line."""
    from tqdm.auto import tqdm

    acc, ev = run.acc, run.evaluator
    run.postfix["eval"] = f"{row['eval_loss']:.3f}"
    if "eval_exact_match" in row:
        run.postfix["acc"] = f"{row['eval_exact_match']:.2f}"
    run.bar.set_postfix(run.postfix)
    if targs.log_with:
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=run.step)
    if not acc.is_main_process:
        return
    with open(run.log_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    parts = ", ".join(f"{k[5:-5]} {v:.4f}" for k, v in row.items()
                      if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss")
    line = (f"mmar: step {run.step}: eval loss {row['eval_loss']:.4f} ({parts})"
            + (f", train loss {row['train_loss']:.4f}" if row.get("train_loss") is not None else "")
            + (f", exact match {row['eval_exact_match']:.1%}" if "eval_exact_match" in row else "")
            + f"; best {ev.best_loss:.4f} at step {ev.best_step}")
    tqdm.write(line)
    if row.get("eval_bad_records") and not ev.told_bad:
        ev.told_bad = True
        tqdm.write(f"mmar: eval: {row['eval_bad_records']} bad held-out record(s) skipped; e.g. "
                   f"{'; '.join(dict.fromkeys(ev.collator.reasons)) or 'see the training log'}")
    if row.get("overfitting") and not ev.warned:
        ev.warned = True
        warnings.warn(f"step {run.step}: the training loss ({row['train_loss']:.4f}) is far below the eval loss "
                      f"({row['eval_loss']:.4f}, over {OVERFIT_RATIO:g}x): the model is memorising its training "
                      "samples; more data, fewer steps, a lower learning rate or early stopping "
                      "(--early_stopping_patience, --load_best_model_at_end) may help", stacklevel=2)
    if ev.stop:
        tqdm.write(f"mmar: early stopping at step {run.step}: {ev.bad_evals} evals without a lower eval loss "
                   f"(best {ev.best_loss:.4f} at step {ev.best_step})")


def finish_eval(run, targs) -> bool:
    """At the end (main process): with ``load_best_model_at_end`` the best eval's weights become the final
    model and a last log row says which step. True when the final model came from ``best``."""
    if run.evaluator is None or not targs.load_best_model_at_end:
        return False
    record = restore_best(targs.output_dir)
    if record is None:
        if run.evaluator.best_step is not None:  # e.g. resumed from a checkpoint copied elsewhere
            warnings.warn(f"load_best_model_at_end: the best eval's weights (step {run.evaluator.best_step}) are "
                          f"not in {os.path.join(targs.output_dir, BEST)}; the final model is the last step's",
                          stacklevel=2)
        return False
    with open(run.log_path, "a") as f:
        f.write(json.dumps({"step": run.step, "final_model_step": record["step"],
                            "best_eval_loss": record["eval_loss"]}) + "\n")
    print(f"mmar: the final model is the best eval's, step {record['step']} (eval loss {record['eval_loss']:.4f})")
    return True
