"""Fuzzing the front doors with hypothesis: every bad input gets a clear error (ValueError / TypeError /
FileNotFoundError naming the problem), never a crash, a hang or another exception type.

Cases per test are set by ``FUZZ_EXAMPLES`` (default 150; 4 tests => 600 cases in CI).
"""

import io
import json
import os
import struct

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmar import Audio, Image, Message  # noqa: E402
from mmar.training.data import Collator, SafeDataset  # noqa: E402
from mmar.training.jsonl import ChatDataset  # noqa: E402

N = int(os.environ.get("FUZZ_EXAMPLES", "150"))
CLEAR = (ValueError, TypeError, FileNotFoundError)
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
COUNTS = {}


def _count(name, outcome):
    COUNTS.setdefault(name, {"cases": 0, "ok": 0, "clear_error": 0})
    COUNTS[name]["cases"] += 1
    COUNTS[name][outcome] += 1


def _png(arr):
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _wav(samples: int) -> bytes:
    data = struct.pack(f"<{samples}h", *([1000] * samples))
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


arrays = st.one_of(
    st.builds(lambda h, w, v: np.full((h, w), v, dtype=np.uint8), st.integers(0, 40), st.integers(0, 40),
              st.integers(0, 255)),
    st.builds(lambda c, v: torch.full((c, 8, 8), v), st.integers(1, 4),
              st.sampled_from([0.5, -1.0, 2.0, float("nan"), float("inf")])),
    st.builds(lambda shape: np.zeros(shape, dtype=np.float64), st.lists(st.integers(0, 9), max_size=4)),
    st.sampled_from([None, 3, "x", b"bytes", {"a": 1}, [1, 2, 3]]),
)


@FUZZ
@given(item=arrays)
def test_image_tokenizer_and_sequence_builder(tiny, item):
    _, proc = tiny
    try:
        proc.encode([Message("user", [Image(item), "which digit is this?"]), Message("assistant", "3")])
        _count("image inputs", "ok")
    except CLEAR as e:
        assert str(e)
        _count("image inputs", "clear_error")


corrupt_files = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n: _png(np.zeros((8, 8), np.uint8))[:n], st.integers(0, 60)),  # truncated PNG
    st.builds(lambda n: b"\xff\xd8\xff\xe0" + bytes(n), st.integers(0, 100)),  # broken JPEG header
    st.builds(lambda n, k: _wav(n)[:k], st.integers(0, 50), st.integers(0, 200)),  # zero-length / cut WAV
    st.just(_png(np.zeros((4000, 3, 3), np.uint8))),  # a huge, wrong-sized image
)


@FUZZ
@given(data=corrupt_files, suffix=st.sampled_from([".png", ".jpg", ".wav", ".bin"]))
def test_corrupt_files_name_the_file(tiny, tmp_path_factory, data, suffix):
    _, proc = tiny
    path = tmp_path_factory.mktemp("fuzz") / f"input{suffix}"
    path.write_bytes(data)
    try:
        proc.encode([Message("user", [Image(str(path))])])
        _count("corrupt files", "ok")
    except CLEAR as e:
        assert path.name in str(e), str(e)
        _count("corrupt files", "clear_error")


texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, t, b: a + t + b, st.text(max_size=10),
              st.sampled_from(["<|image|>", "<|image_start|>", "<|image_end|>", "<|audio|>", "<|eos|>",
                               "<|bos|>", "<|pad|>"]), st.text(max_size=10)),
    st.sampled_from(["", "   ", "\n\t", "\x00"]),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", errors="surrogateescape")),
)


@FUZZ
@given(text=texts, role=st.sampled_from(["user", "assistant", "system", "robot", ""]))
def test_text_and_roles(tiny, text, role):
    _, proc = tiny
    try:
        proc.encode([Message(role, text)])
        _count("texts and roles", "ok")
    except CLEAR as e:
        assert str(e)
        _count("texts and roles", "clear_error")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
records = st.one_of(
    json_values.map(json.dumps),
    st.builds(lambda role, content: json.dumps({"messages": [{"role": role, "content": content}]}),
              st.sampled_from(["user", "assistant", "x"]), json_values),
    st.binary(max_size=50).map(lambda b: b.decode("latin-1")),
    st.just('{"messages": [{"role": "assistant", "content": [{"type": "image", "path": "nope.png"}]}]}'),
)


@FUZZ
@given(lines=st.lists(records, min_size=1, max_size=5))
def test_jsonl_loader_skips_and_counts(tiny, tmp_path_factory, lines):
    _, proc = tiny
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "draw a 3"}, {"role": "assistant", "content": "3"}]})
    path.write_text("\n".join([good, *[line.replace("\n", " ") for line in lines]]) + "\n", encoding="utf-8",
                    errors="surrogateescape")
    ds = SafeDataset(ChatDataset(str(path)))
    collator = Collator(proc)
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch is not None  # the good record always survives
    assert collator.skipped + batch["input_ids"].shape[0] == len(ds)
    _count("jsonl records", "ok" if collator.skipped == 0 else "clear_error")


def test_report_counts(capsys):
    """Printed for the README's robustness table (run the module to refresh it)."""
    with capsys.disabled():
        for name, c in COUNTS.items():
            print(f"\n[fuzz] {name}: {c['cases']} cases, {c['clear_error']} clear errors, {c['ok']} accepted, 0 crashes")
