"""benchmarks/gpu_check.py's CPU-side logic (the full toy dry run, --device cpu, takes minutes here)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402


def test_skips_cleanly_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "skipped: no CUDA device here" in capsys.readouterr().out


def test_table_and_peak():
    rows = [{"check": "a", "result": "pass", "detail": "max abs diff 1e-7", "memory": "1 MB"}]
    assert gpu_check.table(rows)[-1] == "| a | pass | max abs diff 1e-7 | 1 MB |"
    assert all(len(line.split("|")) == 6 for line in gpu_check.table(rows))  # no stray pipes
    assert gpu_check.peak_flops("cpu", None) is None and gpu_check.peak_flops("cpu", 100.0) == 1e14
    assert sum(p.numel() for p in gpu_check.make(gpu_check.TOY, "cpu")[0].parameters()) > 0
