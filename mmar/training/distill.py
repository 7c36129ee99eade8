"""``mmar distill-head``: distil a trained model's diffusion or flow head into a few-step head.

The backbone stays frozen. Its hidden states before every generated token of the training data are the
conditions (the conditional branch: the sample as trained; the unconditional branch: BOS and the item
alone, exactly what classifier-free guidance's copy sees in the sampler). The teacher's deterministic
``teacher_steps``-step sampler is run once from fixed noise for a pool of those conditions at each
distilled guidance scale, its states kept at the student's grid times; the student
(:class:`mmar.heads.FewStepHead`, initialised from the teacher) then regresses them, jump by jump. A
held-out share of the conditions measures the error on conditions never trained on (``val_loss``).
The method and why it was chosen: :mod:`mmar.heads.fewstep`.

Writes ``output/`` atomically: the model with the few-step head (safetensors + config.json, loadable
by ``MMARPipeline.from_pretrained``), its processor and sampling defaults, ``log.jsonl``,
``loss_curve.png`` and ``distill.json`` (the settings and the losses before and after).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.registry import Collator, build_dataset, is_generation_sample
from ..heads import FewStepHead
from .pictures import plot_loss_curve

TEACHER_CHUNK = 4096  # rows per teacher call while building the pool (bounds memory)


@dataclass
class DistillArguments:
    """The settings of one distillation (the CLI's flags)."""

    model: str
    output: str
    steps: int = 1  # the student's sampling steps (it samples in 1..steps)
    teacher_steps: int = 50
    guidance_scales: list[float] | None = None  # None: 1 and the model's default CFG scale
    pairs: int = 16384  # (condition, noise) rows per guidance scale in the teacher pool
    max_steps: int = 1500
    batch_size: int = 512
    learning_rate: float = 3e-4
    warmup_steps: int = 50
    val_fraction: float = 0.05
    modality: str | None = None  # None: the model's one modality with a diffusion or flow head
    dataset: str = "digits"
    data_files: list[str] | None = None
    dataset_options: dict = field(default_factory=dict)
    max_samples: int | None = None  # use the first N generation samples of the data only
    seed: int = 0
    embedded_guidance: bool = False  # the student sees the conditional branch alone (no CFG copy in sampling)
    logging_steps: int = 50
    num_threads: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "teacher_steps", "pairs", "max_steps", "batch_size", "logging_steps", "max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps > self.teacher_steps:
            raise ValueError(f"steps ({self.steps}) must not exceed teacher_steps ({self.teacher_steps})")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if os.path.abspath(self.output) == os.path.abspath(self.model):
            raise ValueError(f"--output {self.output} is the teacher's directory; write the student elsewhere")


def pick_modality(model, asked: str | None) -> str:
    """The modality whose head is distilled: ``asked``, or the only one with a diffusion / flow head."""
    able = [m for m, h in model.heads.items() if model.config.modalities[m].head.get("name") in ("diffusion", "flow")]
    if asked is not None:
        if asked not in able:
            raise ValueError(f"modality {asked!r} has no diffusion or flow head to distil (this model: "
                             f"{', '.join(able) or 'none'})")
        return asked
    if len(able) != 1:
        raise ValueError(f"name the modality to distil (--modality): candidates {', '.join(able) or 'none'}")
    return able[0]


def _item_rows(batch: dict, processor, modality: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unconditional rows of a conditional batch: BOS + each trained item alone (start, marker,
    placeholders, end), as the sampler's CFG copy sees it, right-padded; and their tokens in order."""
    ids, labels = batch["input_ids"], batch["labels"]
    tid = processor.token_ids[modality]
    ph, values = tid["token"], batch["values"][modality]
    ph_index = torch.cumsum((ids == ph).flatten(), 0).reshape(ids.shape) - 1  # row-major index into values
    rows, toks = [], []
    for r in range(ids.shape[0]):
        starts = (ids[r] == tid["start"]).nonzero().flatten().tolist()
        ends = (ids[r] == tid["end"]).nonzero().flatten().tolist()
        for s in starts:
            e = next(e for e in ends if e > s)
            span = slice(s + 1, e)
            if not (labels[r, span][ids[r, span] == ph] == ph).any():
                continue  # an input item (understanding), not generated: no head call in generation
            rows.append(([] if processor.bos_id is None else [processor.bos_id]) + ids[r, s:e + 1].tolist())
            toks.append(values[ph_index[r, span][ids[r, span] == ph]])
    longest = max(len(x) for x in rows)
    out = torch.full((len(rows), longest), processor.pad_id, dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, x in enumerate(rows):
        out[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return out, mask, torch.cat(toks)


@torch.no_grad()
def frozen_pairs(pipe, modality: str, args: DistillArguments, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)``: the frozen backbone's hidden states before every generated token of the
    training data, for the conditional and the unconditional branch (one row per token, paired)."""
    ds = build_dataset(args.dataset, "train", seed=args.seed, data_files=args.data_files, **args.dataset_options)
    samples = []
    for i in range(len(ds)):
        if args.max_samples is not None and len(samples) >= args.max_samples:
            break
        if is_generation_sample(s := ds[i]):
            samples.append(s)
    if not samples:
        raise ValueError(f"dataset {args.dataset!r} has no generation samples to distil on")
    collator, model, ph = Collator(pipe.processor), pipe.model, pipe.model.placeholder[modality]
    conds, unconds = [], []
    for k in range(0, len(samples), batch):
        b = collator(samples[k:k + batch])
        if b is None:
            continue
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], values=b["values"]).hidden_states
        conds.append(h[:, :-1][b["labels"][:, 1:] == ph])
        uids, umask, utoks = _item_rows(b, pipe.processor, modality)
        hu = model(input_ids=uids, attention_mask=umask, values={modality: utoks}).hidden_states
        unconds.append(hu[:, :-1][uids[:, 1:] == ph])
    cond, uncond = torch.cat(conds), torch.cat(unconds)
    if cond.shape != uncond.shape:
        raise RuntimeError(f"paired {cond.shape[0]} conditional with {uncond.shape[0]} unconditional tokens")
    return cond, uncond


@torch.no_grad()
def teacher_pool(student: FewStepHead, teacher, cond: torch.Tensor, uncond: torch.Tensor, scales: list[float],
                 pairs: int, gen: torch.Generator) -> list[dict]:
    """For each guidance scale, ``pairs`` rows (conditions drawn at random, fresh noise) and the teacher's
    states at the student grid's times from that noise: ``{"w", "cond", "uncond", "states"}``."""
    pool = []
    for w in scales:
        idx = torch.randint(0, cond.shape[0], (pairs,), generator=gen)
        noise = torch.randn(pairs, student.token_dim, generator=gen).to(cond)
        states = torch.cat([student.teacher_states(teacher, noise[k:k + TEACHER_CHUNK], cond[idx[k:k + TEACHER_CHUNK]],
                                                   uncond[idx[k:k + TEACHER_CHUNK]] if w != 1 else None, w)
                            for k in range(0, pairs, TEACHER_CHUNK)], dim=1)
        pool.append({"w": w, "cond": cond[idx], "uncond": uncond[idx], "states": states})
    return pool


def segments(steps: int) -> list[tuple[int, int]]:
    """Every jump between the student grid's ``steps + 1`` times (so it samples in any 1..steps)."""
    return [(i, j) for i in range(steps + 1) for j in range(i + 1, steps + 1)]


def jump_loss(student: FewStepHead, part: dict, rows, seg: tuple[int, int]) -> torch.Tensor:
    """Mean squared error of one jump on ``rows`` of one guidance scale's pool."""
    i, j = seg
    w = part["w"]
    pred = student.jump(part["states"][i, rows], i, j, part["cond"][rows],
                        part["uncond"][rows] if w != 1 else None, w)
    return F.mse_loss(pred.float(), part["states"][j, rows].float())


@torch.no_grad()
def pool_loss(student: FewStepHead, pool: list[dict], chunk: int = 4096) -> float:
    """The loss averaged over every guidance scale and every jump, on a whole pool."""
    total, n = 0.0, 0
    for part in pool:
        rows = part["states"].shape[1]
        for seg in segments(student.steps):
            for k in range(0, rows, chunk):
                r = torch.arange(k, min(rows, k + chunk))
                total += jump_loss(student, part, r, seg).item() * len(r)
                n += len(r)
    return total / n


def split_pairs(cond, uncond, fraction: float, gen: torch.Generator):
    """Train / held-out conditions (held-out ones are never trained on)."""
    perm = torch.randperm(cond.shape[0], generator=gen)
    n_val = max(1, int(fraction * cond.shape[0]))
    val, train = perm[:n_val], perm[n_val:]
    return (cond[train], uncond[train]), (cond[val], uncond[val])


def train_student(student: FewStepHead, pool: list[dict], val: list[dict], args: DistillArguments,
                  log_path: str) -> list[dict]:
    """AdamW with warm-up and cosine decay; each step one guidance scale and one jump, taken in turn."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=0.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(args.warmup_steps, args.max_steps // 10),
                                                        args.max_steps, min_lr_rate=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    segs, rows, log = segments(student.steps), pool[0]["states"].shape[1], []
    bar = tqdm(total=args.max_steps, desc="distilling", disable=not args.progress)
    recent, start = [], time.time()
    for step in range(1, args.max_steps + 1):
        part = pool[step % len(pool)]
        seg = segs[(step // len(pool)) % len(segs)]
        loss = jump_loss(student, part, torch.randint(0, rows, (args.batch_size,), generator=gen), seg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        recent.append(loss.item())
        bar.update(1)
        if step % args.logging_steps == 0 or step == args.max_steps:
            row = {"step": step, "loss": sum(recent) / len(recent), "val_loss": pool_loss(student, val),
                   "lr": sched.get_last_lr()[0], "seconds": round(time.time() - start, 1)}
            recent = []
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val_loss']:.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    bar.close()
    return log


def default_scales(pipe) -> list[float]:
    """1 (no guidance) and the model's default CFG scale."""
    w = float(pipe.generation_config.guidance_scale)
    return [1.0] if w == 1.0 else [1.0, w]


def save_student(pipe, modality: str, student: FewStepHead, tmp: str) -> None:
    """The model with ``student`` as its ``modality`` head, its processor and sampling defaults (steps:
    the head's own) into ``tmp``."""
    pipe.model.heads[modality] = student.eval()
    pipe.model.config.modalities[modality].head = student.spec()
    pipe.generation_config = dataclasses.replace(pipe.generation_config, num_inference_steps=None)
    pipe.save_pretrained(tmp)


def _publish(tmp: str, output: str) -> None:
    """Replace ``output`` by the finished ``tmp`` directory (a reader sees the old one or the new one)."""
    old = output.rstrip(os.sep) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(output):
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def distill(args: DistillArguments) -> dict:
    """Distil ``args.model``'s head into a few-step head written to ``args.output``; returns the summary
    also saved as ``distill.json``."""
    from ..pipeline import MMARPipeline

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    pipe = MMARPipeline.from_pretrained(args.model)
    modality = pick_modality(pipe.model, args.modality)
    pipe.model.requires_grad_(False)
    teacher, spec = pipe.model.heads[modality], dict(pipe.model.config.modalities[modality].head)
    scales = args.guidance_scales or default_scales(pipe)
    student = FewStepHead.from_teacher(teacher, spec, steps=args.steps, teacher_steps=args.teacher_steps,
                                       guidance_scales=scales, embedded_guidance=args.embedded_guidance)
    tmp = args.output.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    start = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    cond, uncond = frozen_pairs(pipe, modality, args)
    train, held = split_pairs(cond, uncond, args.val_fraction, gen)
    pool = teacher_pool(student, teacher, *train, scales, args.pairs, gen)
    val = teacher_pool(student, teacher, *held, scales, max(256, int(args.pairs * args.val_fraction)), gen)
    prepared = time.time() - start
    before = pool_loss(student, val)
    log = train_student(student, pool, val, args, os.path.join(tmp, "log.jsonl"))
    summary = {"model": args.model, "modality": modality, "teacher": spec, "student": student.spec(),
               "token_pairs": cond.shape[0], "held_out_pairs": held[0].shape[0], "pool_rows": args.pairs * len(scales),
               "val_loss_before": before, "val_loss_after": log[-1]["val_loss"],
               "seconds_preparing": round(prepared, 1), "seconds_training": round(time.time() - start - prepared, 1),
               "settings": dataclasses.asdict(args)}
    save_student(pipe, modality, student, tmp)
    plot_loss_curve(os.path.join(tmp, "log.jsonl"), os.path.join(tmp, "loss_curve.png"))
    with open(os.path.join(tmp, "distill.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _publish(tmp, args.output)
    return summary
