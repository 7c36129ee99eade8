"""Robustness, the long runs (issue 7: bad input, crashes and load — nothing lost, nothing let in):

1. the fuzz suite (tests/robustness/test_fuzz.py) with ``--fuzz_examples`` cases per test;
2. ``--trials`` SIGKILL-and-resume trials of `mmar train` on a tiny model (``python -m tests.robustness.faults``);
   when some do not reproduce the uninterrupted losses, the same trials again with ``--cond_dropout_prob 0``;
3. the demo under load: ``--sessions`` gradio_client sessions on 127.0.0.1, ``--per_session`` requests
   each in two rounds (the scenario of tests/robustness/test_demo_load.py), RSS of the server measured;
4. hostile inputs (issue 10): the regression tests of tests/robustness/test_inputs*.py (bombs, 16-bit /
   EXIF / transparent images, tiny WAV rates, over-long prompts and histories, too many items, CLI errors,
   server paths) and tests/robustness/test_training_hardening.py (planted pickles, bad / small / empty data,
   NaN gradients, incomplete checkpoints, a full disk), and the worst client a demo with the CLI's default limits may have: ``--worst_rounds``
   rounds of the costliest requests it may send, the server's peak RSS over its idle RSS measured against
   the documented bound (``WORST_CLIENT_RSS_MB``).

Writes the "robustness" section of BENCHMARKS.md and the table of README's "Robustness (measured)", and prints it.

    python benchmarks/robustness.py [--fuzz_examples 1000] [--trials 10] [--sessions 20 --per_session 12]
                                    [--worst_rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]
from report import machine, update_readme_block, update_section  # noqa: E402

FUZZ_LINE = re.compile(r"\[fuzz\] (.+?): (\d+) cases, (\d+) clear errors, (\d+) accepted")
FUZZ_WHAT = {"image inputs": "image inputs (arrays of any shape, NaN / inf tensors, wrong types)",
             "corrupt files": "corrupt files (random bytes, truncated PNG / JPEG / WAV, huge images)",
             "texts and roles": "texts and roles (special tokens typed in, control characters, unknown roles)",
             "jsonl records": "JSONL training records (broken JSON, wrong shapes, missing images)",
             "image files": "image files (bomb headers, 16-bit levels, alpha onto white, EXIF orientations)",
             "audio files": "WAV files (declared rates 1 Hz - 1 MHz, any length; memory while preprocessing)",
             "prompt sizes": "prompt sizes (up to 30k repeated characters, emoji, 0-60 images) vs positions",
             "training data": "training data (0-6 good records, 0-12 bad or over-long ones, batch 1-8, accumulation, "
                              "streaming, clipping off) through `mmar train`",
             "checkpoint files": "damaged checkpoints (truncated, random bytes, pickle payloads, deleted files, "
                                 "edited JSON) resumed with `latest`"}
FUZZ_TESTS = {"test_image_tokenizer_and_sequence_builder": "image inputs", "test_corrupt_files_name_the_file":
              "corrupt files", "test_text_and_roles": "texts and roles", "test_jsonl_loader_skips_and_counts":
              "jsonl records", "test_image_files_decode_within_limits_and_convert_right": "image files",
              "test_audio_files_cost_what_a_clip_keeps": "audio files",
              "test_prompt_sizes_and_item_counts": "prompt sizes",
              "test_training_data_of_any_size_and_quality": "training data",
              "test_damaged_checkpoints_never_run_code": "checkpoint files"}
HOSTILE_TESTS = ["tests/robustness/test_inputs.py", "tests/robustness/test_inputs_demo.py",
                 "tests/robustness/test_training_hardening.py"]  # the last: training's items 1, 3-5, 8, 11
RECORDS, BATCH = 40, 8  # the kill-and-resume trials' chat records and batch size
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def fuzz(examples: int) -> dict:
    # -rfE: the FAILED lines counted below, whatever the project's addopts say
    cmd = [sys.executable, "-m", "pytest", "tests/robustness/test_fuzz.py", "-s", "-q", "-rfE", "-p", "no:cacheprovider"]
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env={**ENV, "FUZZ_EXAMPLES": str(examples)}, capture_output=True, text=True)
    groups = [{"name": m[1], "cases": int(m[2]), "clear": int(m[3]), "accepted": int(m[4])}
              for m in FUZZ_LINE.finditer(res.stdout)]
    failed = set(re.findall(r"FAILED tests/robustness/test_fuzz.py::(\w+)", res.stdout))
    if res.returncode and not failed:
        raise RuntimeError(f"the fuzz suite did not run (exit {res.returncode}):\n{res.stdout[-3000:]}")
    for g in groups:  # hypothesis stops a test at its first crash: a failed test means at least one
        g["crashed"] = any(FUZZ_TESTS.get(t) == g["name"] for t in failed)
    return {"groups": groups, "failed_tests": len(failed), "seconds": time.time() - start}


def tiny_model_and_data(folder: str) -> tuple[str, str]:
    """The tests' tiny model (tests/conftest.py) and a chat JSONL (as its ``chat_jsonl``, without the bad
    records) with relative image paths."""
    from PIL import Image as PILImage

    from mmar.datasets.digits import load_digit_split
    from tests.conftest import make_tiny

    model, proc = make_tiny()
    model_dir = os.path.join(folder, "tiny_model")
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    x, y = load_digit_split("train")
    path = os.path.join(folder, "chats.jsonl")
    with open(path, "w") as f:
        for i in range(RECORDS):
            PILImage.fromarray(x[i]).save(os.path.join(folder, "imgs", f"{i}.png"))
            if i % 2:
                rec = [{"role": "user", "content": [{"type": "image", "path": f"imgs/{i}.png"},
                                                    {"type": "text", "text": "which digit is this?"}]},
                       {"role": "assistant", "content": str(y[i])}]
            else:
                rec = [{"role": "user", "content": f"draw a {y[i]}"},
                       {"role": "assistant", "content": [{"type": "image", "path": f"imgs/{i}.png"}]}]
            f.write(json.dumps({"messages": rec}) + "\n")
    return model_dir, path


def kill_resume(trials: int, model_dir: str, data: str, workdir: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "tests.robustness.faults", "--trials", str(trials), "--workdir", workdir, "--",
           "--init_from", model_dir, "--dataset", "jsonl", "--data_files", data, "--max_steps", "24",
           "--batch_size", str(BATCH), "--save_steps", "4", "--save_total_limit", "2", "--warmup_steps", "2", *extra]
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"tests.robustness.faults failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        r["identical"] = r["resume_ok"] and not r["mismatched_steps"] and r["final_step"] == 24
    mid = [r for r in rows if r["resumed_from"] > 0]  # the trials that really resumed from a checkpoint
    return {"trials": len(rows), "killed_running": sum(r["killed_while_running"] for r in rows),
            "resumed": sum(r["resume_ok"] for r in rows), "identical": sum(r["identical"] for r in rows),
            "from_checkpoint": len(mid), "from_checkpoint_identical": sum(r["identical"] for r in mid),
            "mismatched_from": [r["resumed_from"] for r in rows if not r["identical"]],
            "max_lost": max((r["lost_steps"] for r in rows), default=0), "seconds": time.time() - start}


def load(model_dir: str, workdir: str, sessions: int, per_session: int) -> dict:
    from tests.robustness.test_demo_load import digit_png, open_sessions, rss_mb, run_round, serve

    half = max(1, per_session // 2)
    with serve(model_dir, os.path.join(workdir, "server"), "--queue_size", str(sessions)) as (proc, url):
        clients = open_sessions(url, sessions, os.path.join(workdir, "downloads"))
        image = digit_png(workdir)
        rss = [rss_mb(proc.pid)]
        rounds = []
        for n in (half, per_session - half):
            rounds.append(run_round(clients, n, image))
            rss.append(rss_mb(proc.pid))
        alive = proc.poll() is None
    return {"sessions": sessions, "requests": sum(r["requests"] for r in rounds),
            "served": sum(r["served"] for r in rounds), "errors": [e for r in rounds for e in r["errors"]],
            "rss": rss, "seconds": sum(r["seconds"] for r in rounds), "alive": alive}


def inputs(select: str = "not worst_client") -> dict:
    """The hostile-input regression tests (all but the worst-client one, measured apart by :func:`worst`),
    counted from pytest's JUnit XML (the project's addopts may silence the summary line)."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "inputs.xml")
        cmd = [sys.executable, "-m", "pytest", *HOSTILE_TESTS, "-q", "-p", "no:cacheprovider", "-k", select,
               f"--junitxml={report}"]
        start = time.time()
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
        if not os.path.isfile(report):
            raise RuntimeError(f"the hostile-input tests did not run (exit {res.returncode}):\n{res.stdout[-3000:]}")
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, bad = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
    return {"passed": total - bad - skipped, "failed": bad, "seconds": time.time() - start}


def worst(model_dir: str, workdir: str, rounds: int) -> dict:
    """The worst client against `mmar demo` with the CLI's default limits (tests/robustness/test_inputs_demo.py)."""
    import gradio_client

    from tests.robustness.test_demo_load import serve
    from tests.robustness.test_inputs_demo import WORST_CLIENT_RSS_MB, digit_and_bomb, worst_client_round

    with serve(model_dir, os.path.join(workdir, "server")) as (proc, url):
        client = gradio_client.Client(url, verbose=False, download_files=os.path.join(workdir, "downloads"))
        client.submit("draw a 3", 1.0, 2, 0, 1, api_name="/generate").result(timeout=60)  # warm
        r = worst_client_round(client, proc.pid, *digit_and_bomb(workdir), rounds=rounds)
        r["alive"] = proc.poll() is None
    return {**r, "bound_mb": WORST_CLIENT_RSS_MB, "rounds": rounds}


def table(f: dict, k: dict, ld: dict, fuzz_examples: int, hi: dict | None = None, w: dict | None = None) -> str:
    rows = ["| check | tried | result |", "|---|---|---|"]
    for g in f["groups"]:
        rows.append(f"| fuzz: {FUZZ_WHAT.get(g['name'], g['name'])} | {g['cases']} cases | {g['clear']} clear errors, "
                    f"{g['accepted']} accepted, **{'>= 1' if g['crashed'] else 0} crashes** |")
    total = sum(g["cases"] for g in f["groups"])
    clear = sum(g["clear"] for g in f["groups"])
    rows.append(f"| fuzz, all ({fuzz_examples} per test) | **{total} cases** | **{clear} clear errors**, "
                f"{total - clear} accepted, **{f['failed_tests']} failed tests** ({f['seconds']:.0f} s) |")
    rows.append(f"| SIGKILL at a random moment of `mmar train` (24 steps, checkpoint every 4), then "
                f"`--resume_from_checkpoint latest` | {k['trials']} trials ({k['killed_running']} still running "
                f"when killed) | **{k['resumed']}/{k['trials']} resumed, {k['identical']}/{k['trials']} identical** "
                f"to the uninterrupted losses after the resume point ({k['from_checkpoint_identical']}/"
                f"{k['from_checkpoint']} of the trials that resumed from a checkpoint; the others were killed before "
                f"the first one and restarted from step 0); at most {k['max_lost']} steps lost "
                f"({k['seconds']:.0f} s) |")
    r0, r1, r2 = ld["rss"]
    rows.append(f"| demo under load: {ld['sessions']} concurrent gradio_client sessions on 127.0.0.1, /generate and "
                f"/chat (text and uploads), tiny model | **{ld['requests']} requests** | **{ld['served']} served, "
                f"{len(ld['errors'])} errors**; server RSS {r0:.0f} MB at start, {r1:.0f} MB after the first half, "
                f"{r2:.0f} MB after the last ({r2 - r1:+.0f} MB); {ld['seconds']:.0f} s |")
    if hi is not None:
        rows.append(f"| hostile inputs (issue 10): decompression bombs, 16-bit / EXIF / transparent images, 1 Hz WAVs, "
                    f"over-long prompts and remembered histories, 50 images, CLI user errors, server paths in "
                    f"messages; training: pickle payloads planted in checkpoints, only bad records, empty and "
                    f"too small data sets, NaN / inf gradients, max_grad_norm 0, truncated newest checkpoint, "
                    f"another run's output_dir, a full disk mid-checkpoint | {hi['passed'] + hi['failed']} regression tests | **{hi['passed']} passed, "
                    f"{hi['failed']} failed** ({hi['seconds']:.0f} s) |")
    if w is not None:
        grew = w["peak_mb"] - w["idle_mb"]
        rows.append(f"| the worst client: `mmar demo` with its default limits, tiny model, {w['rounds']} rounds of the "
                    f"costliest requests allowed (remembered histories up to the caps, 4 uploads, CFG 10, 64 tokens, "
                    f"8 images x 100 steps, bombs) | **{w['requests']} requests** | {w['answered']} answered, "
                    f"{w['refused']} refused with a message; server RSS {w['idle_mb']:.0f} MB idle, peak "
                    f"{w['peak_mb']:.0f} MB (**{grew:+.0f} MB**, bound +{w['bound_mb']} MB); {w['seconds']:.0f} s |")
    return "\n".join(rows)


def notes(k: dict, ld: dict) -> list[str]:
    out = [f"Crash: any exception other than a clear ValueError / TypeError / FileNotFoundError naming the problem "
           f"(a failed fuzz test). The load run's errors: {ld['errors'][:3] or 'none'}; the server was "
           f"{'still running' if ld['alive'] else 'DEAD'} afterwards."]
    if k["mismatched_from"]:
        c = k["control"]
        differing = f"; differing: resumed from steps {c['mismatched_from']}" if c["mismatched_from"] else ""
        out.append(f"Kill-and-resume trials whose losses differed from the uninterrupted run resumed from steps "
                   f"{k['mismatched_from']} ({RECORDS // BATCH} batches per epoch, so mid-epoch checkpoints). The "
                   f"same {c['trials']} trials with `--cond_dropout_prob 0`: {c['identical']}/{c['trials']} "
                   f"identical, {c['from_checkpoint_identical']}/{c['from_checkpoint']} of those that resumed from a "
                   f"checkpoint{differing}. Likely cause: the collator draws its condition dropout from the global "
                   "RNG one batch ahead of training (accelerate's DataLoaderShard fetches the next batch before "
                   "yielding the current one), so the RNG state saved at a mid-epoch checkpoint already includes the "
                   "next batch's draws, which the resumed run then makes again.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fuzz_examples", type=int, default=1000, help="hypothesis cases per fuzz test")
    ap.add_argument("--trials", type=int, default=10, help="kill-and-resume trials")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent demo sessions")
    ap.add_argument("--per_session", type=int, default=12, help="requests per session")
    ap.add_argument("--worst_rounds", type=int, default=3, help="rounds of the worst client's requests")
    args = ap.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mmar-robustness-") as work:
        print(f"fuzzing, {args.fuzz_examples} cases per test ...", flush=True)
        f = fuzz(args.fuzz_examples)
        model_dir, data = tiny_model_and_data(work)
        print(f"{args.trials} kill-and-resume trials ...", flush=True)
        k = kill_resume(args.trials, model_dir, data, os.path.join(work, "kill"))
        if k["mismatched_from"]:  # the control: the same trials without condition dropout
            print("some resumed runs differed; the control run without condition dropout ...", flush=True)
            k["control"] = kill_resume(args.trials, model_dir, data, os.path.join(work, "kill-control"),
                                       "--cond_dropout_prob", "0")
        print(f"the demo under load: {args.sessions} sessions x {args.per_session} requests ...", flush=True)
        ld = load(model_dir, os.path.join(work, "load"), args.sessions, args.per_session)
        print("hostile-input regression tests ...", flush=True)
        hi = inputs()
        print(f"the worst client, {args.worst_rounds} rounds ...", flush=True)
        w = worst(model_dir, os.path.join(work, "worst"), args.worst_rounds)
    minutes = (time.time() - start) / 60
    cmd = (f"python benchmarks/robustness.py --fuzz_examples {args.fuzz_examples} --trials {args.trials} "
           f"--sessions {args.sessions} --per_session {args.per_session} --worst_rounds {args.worst_rounds}")
    body = table(f, k, ld, args.fuzz_examples, hi, w)
    update_section("robustness", "\n".join(["## Robustness: bad input, crashes, load", "",
                                            f"`{cmd}` on {machine()}; {minutes:.1f} min in all.", "", body, "",
                                            *notes(k, ld)]))
    update_readme_block("robustness", f"`{cmd}` ({minutes:.1f} min on {machine()}; the section \"Robustness\" "
                                      f"of `BENCHMARKS.md` has the details):\n\n{body}")
    print(body)
    print(f"\n{cmd}: {minutes:.1f} min; BENCHMARKS.md and README.md updated")
    failed = f["failed_tests"] or k["identical"] < k["trials"] or ld["errors"] or ld["served"] < ld["requests"]
    failed = failed or hi["failed"] or not w["alive"] or w["peak_mb"] - w["idle_mb"] > w["bound_mb"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
