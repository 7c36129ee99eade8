"""The demo under load: `mmar demo` serving a tiny model in its own process (the CLI's defaults: bound to
127.0.0.1, one request at a time, a bounded queue), driven by 20 concurrent gradio_client sessions with
200 short requests across /generate and /chat. Nothing may fail, every request is answered, the server's
memory stays flat, limits are refused with clear messages, and a full queue refuses instead of growing.

All traffic goes to 127.0.0.1; every loop is bounded in count and every wait in time.
The helpers (``serve``, ``open_sessions``, ``run_round``, ``rss_mb``) are reused by benchmarks/robustness.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")

from mmar.demo import MAX_HISTORY_FILES, MAX_HISTORY_MESSAGES, MAX_SEED  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
SESSIONS, PER_SESSION = 20, 5  # one round = 100 requests; the test runs two rounds
MAX_PROMPT, MAX_TOKENS, QUEUE = 100, 8, SESSIONS  # every session can wait at once: none is refused
RSS_MARGIN_MB = 40  # the second 100 requests may add at most this much to the server's RSS
REQUEST_TIMEOUT, START_TIMEOUT = 60, 120  # seconds
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir, workdir, *args: str):
    """Run ``mmar demo --model model_dir`` on a free port (host left to the CLI's default); yields
    ``(process, url)`` once the port answers, and stops the server afterwards."""
    port = free_port()
    os.makedirs(workdir, exist_ok=True)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TMPDIR": str(workdir), "GRADIO_TEMP_DIR": os.path.join(workdir, "gradio")}
    cmd = [sys.executable, "-m", "mmar.cli", "demo", "--model", str(model_dir), "--port", str(port),
           "--examples", "none", *args]
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the demo exited with code {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"the demo did not answer on port {port} within {START_TIMEOUT} s")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.25)
        yield proc, f"http://{HOST}:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def open_sessions(url: str, n: int, download_dir) -> list:
    """``n`` gradio_client sessions, opened concurrently."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: gradio_client.Client(url, verbose=False,
                                                            download_files=os.path.join(download_dir, str(i))),
                             range(n)))


def _request(client, session: int, k: int, image: str) -> None:
    """One short request (the kind rotates per session and step); raises if the answer is not a full one."""
    kind, digit = (session + k) % 3, WORDS[(session + k) % 10]
    if kind == 0:
        n = 1 + k % 2
        out = client.submit(f"draw the digit {digit}", 1.0 + k % 2, 2, session * 100 + k, n,
                            api_name="/generate").result(timeout=REQUEST_TIMEOUT)
        assert len(out) == n and all(os.path.isfile(o["image"]) for o in out), out
        return
    files = [gradio_client.handle_file(image)] if kind == 2 else []
    text = "which digit is this?" if files else f"draw the digit {digit}"
    history, _ = client.submit({"text": text, "files": files}, [], 1.0, 4, 1.0, False,
                               api_name="/chat").result(timeout=REQUEST_TIMEOUT)
    assert history[-1]["role"] == "assistant" and history[-1]["content"], history
    user_texts = [p.get("text") for m in history if m["role"] == "user" for p in m["content"]]
    assert text in user_texts, history


def run_round(clients: list, per_session: int, image: str) -> dict:
    """Every session sends ``per_session`` requests in a row, all sessions at once; returns
    ``{"requests", "served", "errors": [messages], "seconds"}``."""
    errors, served, lock = [], [0], threading.Lock()

    def session(i: int) -> None:
        for k in range(per_session):
            try:
                _request(clients[i], i, k, image)
                with lock:
                    served[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"session {i} request {k}: {type(e).__name__}: {e}"[:300])

    start = time.time()
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(session, range(len(clients))))
    return {"requests": len(clients) * per_session, "served": served[0], "errors": errors,
            "seconds": time.time() - start}


def digit_png(folder) -> str:
    from PIL import Image as PILImage

    from mmar.datasets.digits import load_digit_split

    path = os.path.join(folder, "digit.png")
    PILImage.fromarray(load_digit_split("test")[0][0]).resize((64, 64), PILImage.NEAREST).save(path)
    return path


# -- the tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo_load")
    with serve(tiny_dir, str(work / "server"), "--queue_size", str(QUEUE), "--max_prompt_chars", str(MAX_PROMPT),
               "--max_new_tokens", str(MAX_TOKENS)) as (proc, url):
        yield proc, url, work


@pytest.fixture(scope="module")
def sessions(server):
    _, url, work = server
    return open_sessions(url, SESSIONS, str(work / "downloads"))


def test_bound_to_loopback_by_default(server):
    proc, url, _ = server
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {(HOST, int(url.rstrip("/").rsplit(":", 1)[1]))}, listening


def test_twenty_sessions_two_hundred_requests(server, sessions):
    proc, _, work = server
    image = digit_png(str(work))
    first = run_round(sessions, PER_SESSION, image)
    rss_first = rss_mb(proc.pid)
    last = run_round(sessions, PER_SESSION, image)
    rss_last = rss_mb(proc.pid)
    print(f"\n[load] {SESSIONS} sessions: first {first['served']}/{first['requests']} in {first['seconds']:.1f} s, "
          f"last {last['served']}/{last['requests']} in {last['seconds']:.1f} s; server RSS {rss_first:.0f} MB "
          f"-> {rss_last:.0f} MB")
    assert first["errors"] == [] and last["errors"] == []
    assert first["served"] == last["served"] == SESSIONS * PER_SESSION
    assert rss_last - rss_first <= RSS_MARGIN_MB, (rss_first, rss_last)
    assert proc.poll() is None


def _said(*parts) -> dict:
    """A user message as gradio_client sends the history back: text parts and uploaded files."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "file", "file": p} for p in parts]}


def test_limits_are_refused_with_clear_messages(server, sessions, tmp_path):
    import httpx

    proc, url, _ = server
    client = sessions[0]
    upload = gradio_client.handle_file(digit_png(str(tmp_path)))
    hi = {"text": "hi", "files": []}
    refused = [  # (arguments, endpoint, what the message must say)
        (("x" * (MAX_PROMPT + 1), 1.0, 2, 0, 1), "/generate", f"at most {MAX_PROMPT}"),
        (({"text": "y" * 5000, "files": []}, [], 1.0, 4, 1.0, False), "/chat", f"at most {MAX_PROMPT}"),
        ((hi, [], 1.0, MAX_TOKENS + 1, 1.0, False), "/chat", f"greater than maximum value {MAX_TOKENS}"),
        (("draw a 3", 1.0, 2, 0, 99), "/generate", "greater than maximum value 8"),  # images per request
        (("draw a 3", 1.0, 1000, 0, 1), "/generate", "greater than maximum value 100"),  # inference steps
        (("draw a 3", 1.0, 2, 10**30, 1), "/generate", f"greater than maximum value {MAX_SEED}"),
        (("draw a 3", 1.0, 2, -1, 1), "/generate", "less than minimum value 0"),
        (({"text": "", "files": []}, [], 1.0, 4, 1.0, False), "/chat", "Type a message or attach a file"),
        # with memory on, the history goes to the model too: its length is capped like the prompt's
        ((hi, [_said("z")] * (MAX_HISTORY_MESSAGES + 1), 1.0, 4, 1.0, True), "/chat", "too long to remember"),
        ((hi, [_said("z" * (MAX_HISTORY_MESSAGES * MAX_PROMPT + 1))], 1.0, 4, 1.0, True), "/chat",
         "too long to remember"),
        ((hi, [_said(upload)] * (MAX_HISTORY_FILES + 1), 1.0, 4, 1.0, True), "/chat", "too long to remember"),
    ]
    for args, api, message in refused:
        with pytest.raises(Exception, match=message):
            client.submit(*args, api_name=api).result(timeout=REQUEST_TIMEOUT)
    # uploads over 2 MB: the client refuses them, and so does the server when a client does not check
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.submit({"text": "which digit?", "files": [gradio_client.handle_file(str(big))]}, [], 1.0, 4, 1.0,
                      False, api_name="/chat").result(timeout=REQUEST_TIMEOUT)
    with open(big, "rb") as f:
        r = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=30)
    assert r.status_code == 413 and "maximum allowed size" in r.text, (r.status_code, r.text[:200])
    # a short history with memory on is answered, and the server still answers after all of the above
    history, _ = client.submit({"text": "draw the digit one", "files": []}, [_said("hi", upload)], 1.0, 4, 1.0,
                               True, api_name="/chat").result(timeout=REQUEST_TIMEOUT)
    assert history[-1]["role"] == "assistant" and proc.poll() is None


def test_a_full_queue_refuses_instead_of_growing(tiny, tmp_path):
    """Queue of 2, one worker, 12 slow requests at once: the extra ones get gradio's "queue is full"
    error straight away; the ones let in are all answered."""
    from gradio_client.utils import QueueError

    from mmar.demo import build_demo, launch
    from mmar.pipeline import MMARPipeline

    model, processor = tiny
    pipe = MMARPipeline(model, processor)
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe, queue_size=2, max_images=8)
    assert demo._queue.max_size == 2
    assert {fn.concurrency_id for fn in demo.fns.values() if fn.api_name in ("chat", "generate")} == {"model"}
    assert demo._queue.default_concurrency_limit == 1
    port = free_port()
    launch(demo, host=HOST, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://{HOST}:{port}/", verbose=False, download_files=str(tmp_path))
        jobs = [client.submit("draw the digit seven", 3.0, 60, i, 8, api_name="/generate") for i in range(12)]
        answered, full = 0, 0
        for job in jobs:
            try:
                answered += len(job.result(timeout=REQUEST_TIMEOUT)) == 8
            except QueueError as e:
                assert "Queue is full" in str(e), e
                full += 1
        print(f"\n[queue] 12 requests at once, queue of 2: {answered} answered, {full} refused as full")
        assert full >= 1 and answered >= 2 and answered + full == len(jobs), (answered, full)
    finally:
        demo.close()
