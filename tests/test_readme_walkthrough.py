"""The README's fine-tuning walk-through runs as written.

The commands are read from the README block after ``<!-- walkthrough: fine-tuning -->`` and run verbatim
by bash (the venv's ``mmar`` and ``python`` first on PATH, this tree on PYTHONPATH) in a temporary
directory holding what the walk-through names: ``models/llama`` (a saved tiny Llama backbone with its own
tokenizer), ``my_chats.jsonl`` and ``held_out.jsonl`` (coloured squares, images next to them) and
``square.png``.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- walkthrough: fine-tuning -->"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def walkthrough_commands() -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.count(MARK) == 1, f"README.md needs exactly one {MARK}"
    found = re.search(r"```bash\n(.*?)```", readme[readme.index(MARK):], re.S)
    assert found, f"no ```bash block after {MARK}"
    return found.group(1)


def _square(colour: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((16, 16, 3), 245, dtype=np.int16)
    at = rng.integers(0, 8, size=2)
    pixels[at[0]:at[0] + 8, at[1]:at[1] + 8] = COLOURS[colour]
    return Image.fromarray(np.clip(pixels + rng.integers(-10, 11, pixels.shape), 0, 255).astype(np.uint8))


def _write_records(root, name: str, n: int, seed: int) -> None:
    (root / "imgs").mkdir(exist_ok=True)
    with open(root / name, "w") as f:
        for i in range(n):
            colour = list(COLOURS)[i % len(COLOURS)]
            path = f"imgs/{name[:-6]}_{i}.png"
            _square(colour, seed + i).save(root / path)
            if i % 3 == 2:  # some text-to-image records too
                turns = [{"role": "user", "content": f"draw a {colour} square"},
                         {"role": "assistant", "content": [{"type": "image", "path": path}]}]
            else:
                turns = [{"role": "user", "content": [{"type": "image", "path": path},
                                                      {"type": "text", "text": "which colour is this square?"}]},
                         {"role": "assistant", "content": colour}]
            f.write(json.dumps({"messages": turns}) + "\n")


def _fixture(root) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmar.tokenizers import train_bpe_tokenizer

    texts = ["which colour is this square?", *(f"draw a {c} square" for c in COLOURS), *COLOURS, "user", "assistant"]
    tok = train_bpe_tokenizer(texts * 20, vocab_size=120)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64,
                                 max_position_embeddings=128)).save_pretrained(root / "models" / "llama")
    tok.save_pretrained(root / "models" / "llama")
    _write_records(root, "my_chats.jsonl", 60, seed=0)
    _write_records(root, "held_out.jsonl", 12, seed=1000)
    _square("blue", 7).save(root / "square.png")


def test_the_fine_tuning_walkthrough_runs_as_written(tmp_path):
    commands = walkthrough_commands()
    _fixture(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "lora"
    assert (run / "adapter_config.json").exists() and (run / "base" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and all("eval_image_loss" in r and "eval_exact_match" in r for r in evals)
    assert "eval loss" in res.stdout and "final model is the best eval's" in res.stdout
    assert rows[-1]["final_model_step"] == min(evals, key=lambda r: r["eval_loss"])["step"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_records"] == 12 and 0.0 <= metrics["exact_match"] <= 1.0
    assert "frechet_distance" in metrics
    assert re.search(r"^\[0\] '", res.stdout, re.M)  # mmar generate printed its answer
    assert (tmp_path / "outputs" / "generation.json").exists()
    assert (tmp_path / "runs" / "merged" / "config.json").exists()
    assert res.stdout.strip().splitlines()[-1] == "MMARModel"  # PeftModel.from_pretrained + merge_and_unload
