"""Shared helpers: each benchmark rewrites its own section of BENCHMARKS.md, keeping the others."""

from __future__ import annotations

import datetime
import os
import platform
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "BENCHMARKS.md")
HEADER = "# Benchmarks\n\nRows are written by the scripts in `benchmarks/` (`make bench`); each section says how it was made.\n"


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {datetime.date.today().isoformat()}")


def matmul_gflops(n: int = 1024, repeat: int = 5) -> float:
    """The machine's fp32 matmul speed now (GFLOP/s of an ``n`` x ``n`` matmul, best of ``repeat``), to state
    beside an absolute time: the same box has measured 120 to 363 GFLOP/s on different days."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def update_section(name: str, body: str) -> None:
    text = open(PATH).read() if os.path.exists(PATH) else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, PATH)


def update_readme_block(name: str, text: str) -> None:
    """Rewrite README.md's ``<!-- name:start -->`` ... ``<!-- name:end -->`` block (left alone, with a note,
    where README has none)."""
    path = os.path.join(ROOT, "README.md")
    readme = open(path).read()
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    if not pattern.search(readme):
        print(f"README.md has no {name} block; headline not written")
        return
    readme = pattern.sub(lambda _: f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->", readme)
    with open(path + ".tmp", "w") as f:
        f.write(readme)
    os.replace(path + ".tmp", path)
