"""Kill-and-resume trials: train, SIGKILL at a random moment, resume from the latest checkpoint, and
check that nothing was lost beyond one save interval and that the losses after the resume point equal
those of an uninterrupted run. Used by the robustness tests (a few trials) and by
``python -m tests.robustness.faults`` for long runs."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time


def losses(out: str) -> dict[int, float]:
    path = os.path.join(out, "log.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    return {r["step"]: r["loss"] for r in rows}


def kill_resume_trial(cmd: list[str], out: str, reference: dict[int, float], save_steps: int, max_steps: int,
                      kill_at_step: int, env: dict, timeout: float = 300, extra_delay_s: float = 0.0) -> dict:
    """One trial. ``cmd`` is a full `mmar train` command line writing to ``out`` (logging every step); the
    process is killed ``extra_delay_s`` after step ``kill_at_step`` is logged (mid-step, mid-checkpoint...)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and max(losses(out), default=0) < kill_at_step and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(extra_delay_s)
    killed_alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = max(losses(out), default=0)
    from mmar.training.trainer import checkpoint_dirs

    ckpts = checkpoint_dirs(out)
    resumed_from = int(os.path.basename(ckpts[-1])[5:]) if ckpts else 0
    res = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True,
                         timeout=timeout)
    after = losses(out)
    mismatched = [s for s in range(resumed_from + 1, max_steps + 1)
                  if s not in after or abs(after[s] - reference[s]) > 1e-4 * max(1.0, abs(reference[s]))]
    return {"killed_while_running": killed_alive, "kill_at_step": kill_at_step, "steps_logged": logged,
            "resumed_from": resumed_from, "lost_steps": max(0, logged - resumed_from),
            "resume_ok": res.returncode == 0, "final_step": max(after, default=0), "mismatched_steps": mismatched,
            "error": res.stderr[-500:] if res.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="runs/kill-resume")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments after -- go to `mmar train`")
    args = ap.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "mmar.cli", "train", "--progress", "false", "--logging_steps", "1", *extra]
    ref_dir = os.path.join(args.workdir, "reference")
    subprocess.run(base + ["--output_dir", ref_dir], env=env, check=True, capture_output=True)
    reference = losses(ref_dir)
    rng, results = random.Random(args.seed), []
    for t in range(args.trials):
        out = os.path.join(args.workdir, f"trial{t}")
        r = kill_resume_trial(base + ["--output_dir", out], out, reference, 0, max(reference),
                              rng.randint(1, max(reference) - 1), env, extra_delay_s=rng.uniform(0, 0.3))
        results.append(r)
        print(json.dumps(r))
    ok = sum(r["resume_ok"] and not r["mismatched_steps"] for r in results)
    print(f"{ok}/{len(results)} trials resumed and matched the uninterrupted run")


if __name__ == "__main__":
    main()
