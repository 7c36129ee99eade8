"""One training step: forward, backward, clipping and the optimizer step on a batch, with the NaN / inf guard
that skips a bad batch on every process alike (and stops a run after ``max_bad_steps`` in a row)."""

from __future__ import annotations

import warnings

import torch
from accelerate import Accelerator

from .arguments import TrainingArguments
from .run_state import Run


def finite_everywhere(acc: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (they must all skip, or none)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(acc.reduce(bad, "sum").item() == 0)


def train_step(run: Run, batch: dict, targs: TrainingArguments):
    """Forward, backward and (at the end of an accumulation) the optimizer step on one loader batch.
    Returns the model output, or None when the loss was NaN / inf somewhere and the batch was skipped."""
    acc, model = run.acc, run.model
    with acc.accumulate(model):
        out = model(**batch)
        if not finite_everywhere(acc, out.loss):
            return skip_bad_batch(run, targs, f"loss is {out.loss.item()}")
        acc.backward(out.loss)
        if acc.sync_gradients:
            run.grad_norm = gradient_norm(run, targs)
            if checks_gradients(acc) and run.grad_norm is not None and not finite_everywhere(acc, run.grad_norm):
                return skip_bad_batch(run, targs,
                                      f"gradient norm is {float(run.grad_norm)} (loss {out.loss.item():.4g})")
            run.bad_in_a_row = 0
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
    return out


def gradient_norm(run: Run, targs: TrainingArguments):
    """The total gradient norm, clipped to ``max_grad_norm`` when it is set (measured without clipping when
    it is 0); None where DeepSpeed keeps the gradients (it clips them itself)."""
    if targs.max_grad_norm:
        return run.acc.clip_grad_norm_(run.model.parameters(), targs.max_grad_norm)
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def checks_gradients(acc: Accelerator) -> bool:
    """Whether a NaN / inf gradient norm skips the step here: not with an fp16 gradient scaler (it skips
    those steps itself and lowers its scale), nor under DeepSpeed (its engine has stepped already)."""
    from accelerate.utils import DistributedType

    return acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED


def skip_bad_batch(run: Run, targs: TrainingArguments, what: str) -> None:
    """A NaN / inf loss or gradient: drop the batch's gradients, count it, warn; ``max_bad_steps`` in a row
    stop the run. (With an fp16 gradient scaler, inf gradients are the scaler's to skip.)"""
    run.bad_in_a_row += 1
    run.bad_steps += 1
    run.opt.zero_grad(set_to_none=True)
    if run.bad_in_a_row >= targs.max_bad_steps:
        raise FloatingPointError(
            f"{run.bad_in_a_row} steps in a row had a NaN / inf loss or gradient (last at step {run.step + 1}: "
            f"{what}); stopping. Lower the learning rate, check the data, or resume from a checkpoint.")
    warnings.warn(f"step {run.step + 1}: {what}; skipping this batch ({run.bad_in_a_row} in a row, the run "
                  f"stops at {targs.max_bad_steps}; {run.bad_steps} skipped in all)")
    return None
