"""Fine-tuning: user JSONL data, LoRA (peft), packing, resume after SIGKILL, two processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mmar import MMARModel, MMARProcessor
from mmar.cli import main
from mmar.datasets import DigitsDataset
from mmar.training.lora import apply_lora
from tests.conftest import TINY_MODALITIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(model, batch):
    with torch.no_grad():
        h = model(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states
        return h, model.lm_head(h) if hasattr(model, "lm_head") else None


def _head_outputs(model, h):
    """The image head's velocity / noise prediction and a 3-step sample for the hidden states ``h`` (fixed
    noise, fixed timesteps): what the model's diffusion head makes of them."""
    head = model.heads["image"]
    cond = h.reshape(-1, h.shape[-1])[:16]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(cond), head.token_dim, generator=g)
    t = torch.randint(0, 1000, (len(cond),), generator=g)
    with torch.no_grad():
        sample = head.sample(cond, num_inference_steps=3, generator=torch.Generator().manual_seed(1))
        return head.net(x, t, cond), sample


def test_lora_on_a_saved_llama_backbone_reloads_and_merges(tmp_path, tiny):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmar import build_model

    _, proc = tiny
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).save_pretrained(tmp_path / "llama")
    model = build_model(str(tmp_path / "llama"), proc.tokenizer, TINY_MODALITIES)
    model.save_pretrained(tmp_path / "base")
    proc.save_pretrained(tmp_path / "base")
    peft_model = apply_lora(MMARModel.from_pretrained(tmp_path / "base"), {"r": 4, "alpha": 8},
                            base_path=str(tmp_path / "base"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("heads.image" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    assert not any("embed_tokens.base_layer" in n or n.endswith("embed_tokens.weight") for n in trainable)
    ds = DigitsDataset()
    batch = proc([ds[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    proc.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(MMARModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    # hidden states, the LM head's logits and the image head's outputs (on the same hidden states)
    h, logits = _outputs(peft_model, batch)
    head_out = _head_outputs(peft_model, h)
    h2, logits2 = _outputs(reloaded, batch)
    assert torch.equal(h, h2) and torch.equal(logits, logits2)
    assert all(torch.equal(a, b) for a, b in zip(head_out, _head_outputs(reloaded, h)))
    base = MMARModel.from_pretrained(tmp_path / "base").eval()
    base_h, base_logits = _outputs(base, batch)
    assert not torch.allclose(h, base_h, atol=1e-3)  # the adapter changed something
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(head_out, _head_outputs(base, h)))  # head trained
    assert main(["merge-lora", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = MMARModel.from_pretrained(tmp_path / "merged").eval()
    h3, logits3 = _outputs(merged, batch)
    assert torch.allclose(h, h3, atol=1e-5) and torch.allclose(logits, logits3, atol=1e-4)
    for a, b in zip(head_out, _head_outputs(merged, h)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert MMARProcessor.from_pretrained(tmp_path / "merged").token_ids == proc.token_ids


def test_user_jsonl_finetunes_a_saved_model_with_lora_from_the_cli(tmp_path, tiny_dir, chat_jsonl, capsys):
    from peft import PeftModel

    out = tmp_path / "lora"
    args = ["train", "--init_from", str(tiny_dir), "--dataset", "jsonl", "--data_files", str(chat_jsonl),
            "--lora", "{r: 8, alpha: 16}", "--packing", "true", "--max_length", "64", "--max_steps", "12",
            "--batch_size", "8", "--learning_rate", "5e-3", "--warmup_steps", "2", "--logging_steps", "2",
            "--save_steps", "0", "--output_dir", str(out), "--progress", "false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "gone.png" in printed and "reserved token" in printed
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(MMARModel.from_pretrained(tiny_dir), out).eval()
    proc = MMARProcessor.from_pretrained(out)
    batch = proc([DigitsDataset()[i] for i in range(4)])
    h, _ = _outputs(model, batch)
    h0, _ = _outputs(MMARModel.from_pretrained(tiny_dir).eval(), batch)
    assert not torch.allclose(h, h0, atol=1e-4)


def test_packed_and_padded_batches_give_the_same_per_sample_losses(tiny):
    model, proc = tiny
    ds = DigitsDataset()
    enc = [proc.encode(ds[i]) for i in range(0, 3500, 151)]
    padded, packed = proc.collate(enc), proc.pack(enc, max_length=64)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        hp = model(padded["input_ids"], padded["attention_mask"], padded["position_ids"],
                   values=padded["values"]).hidden_states
        hk = model(packed["input_ids"], None, packed["position_ids"], values=packed["values"]).hidden_states

    def text_loss(h, labels):
        nxt = labels[1:]
        keep = (nxt != -100) & (nxt != proc.token_ids["image"]["token"])
        return torch.nn.functional.cross_entropy(model.lm_head(h[:-1][keep]), nxt[keep])

    seen = 0
    for r, (lens, index) in enumerate(zip(packed["seq_lens"], packed["sample_index"])):
        at = 0
        for n, k in zip(lens, index):
            assert torch.allclose(hk[r, at:at + n], hp[k, :n], atol=1e-5)
            assert torch.allclose(text_loss(hk[r, at:at + n], packed["labels"][r, at:at + n]),
                                  text_loss(hp[k, :n], padded["labels"][k, :n]), atol=1e-5)
            at, seen = at + n, seen + 1
    assert seen == len(enc)
    with pytest.raises(ValueError, match="longer than max_length=8"):
        proc.pack(enc, max_length=8)


def _train_cmd(out, data, extra=()):
    return [sys.executable, "-m", "mmar.cli", "train", "--init_from", str(data["model"]), "--dataset", "jsonl",
            "--data_files", str(data["jsonl"]), "--max_steps", "20", "--batch_size", "8", "--logging_steps", "1",
            "--save_steps", "5", "--save_total_limit", "2", "--warmup_steps", "2", "--learning_rate", "3e-3",
            "--output_dir", str(out), "--progress", "false", *extra]


def _losses(out, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r}


def _recording(cmd, where, env):
    """``cmd`` (and its env) run through tests/record_shards.py: each process writes the sample indices of
    its training batches under ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    i = cmd.index("mmar.cli")
    return [*cmd[:i], "tests.record_shards", *cmd[i + 1:]], {**env, "MMAR_RECORD_SHARDS": str(where)}


def _batches(where, rank):
    return [json.loads(line) for line in (where / f"rank{rank}.jsonl").read_text().splitlines()]


def check_sharding(one, two, steps, per_process, n_records):
    """The data sharding itself, from the recorded indices: at each of ``steps`` global steps the two
    processes' batches are disjoint and, rank 0's then rank 1's, exactly the one-process run's batch;
    within an epoch no record is read twice (``drop_last``: the first full batches of one permutation)."""
    ref = _batches(one, 0)[:steps]  # a loader may collate one batch ahead: only the trained ones count
    r0, r1 = _batches(two, 0)[:steps], _batches(two, 1)[:steps]
    assert len(ref) == len(r0) == len(r1) == steps and not (two / "rank2.jsonl").exists()
    for s, (a, b, want) in enumerate(zip(r0, r1, ref), 1):
        assert len(a["indices"]) == len(b["indices"]) == per_process, s
        assert not set(a["indices"]) & set(b["indices"]), (s, a, b)  # never the same records on both
        assert a["indices"] + b["indices"] == want["indices"], (s, a, b, want)
        assert a["epoch"] == b["epoch"] == want["epoch"], s
    for epoch in {a["epoch"] for a in r0}:
        seen = [i for a, b in zip(r0, r1) if a["epoch"] == epoch for i in a["indices"] + b["indices"]]
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(n_records)), epoch


def test_resume_after_sigkill_gives_the_same_losses(tmp_path, tiny_dir, chat_jsonl):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = {"model": tiny_dir, "jsonl": chat_jsonl}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, data), check=True, env=env, cwd=ROOT, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, data), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step_10").exists()
    subprocess.run(_train_cmd(killed, data, ["--resume_from_checkpoint", "latest"]), check=True, env=env,
                   cwd=ROOT, capture_output=True)
    a, b = _losses(full), _losses(killed)
    assert max(b) == 20
    for step in range(11, 21):  # 40 records / batch 8: these cross epoch boundaries
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), step


def test_two_processes_match_one_process(tmp_path, tiny_dir, chat_jsonl):
    """accelerate launch with 2 CPU processes (gloo), batch 4 each == 1 process with batch 8; the held-out
    eval (here the 42 training records, 2 of them bad) is averaged over both processes."""
    data = {"model": tiny_dir, "jsonl": chat_jsonl}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    evals = ["--eval_data_files", str(chat_jsonl), "--eval_steps", "5", "--eval_batch_size", "4"]
    one = tmp_path / "one"
    cmd, one_env = _recording(_train_cmd(one, data, ["--max_steps", "10", "--save_steps", "0", *evals]),
                              tmp_path / "one_batches", env)
    subprocess.run(cmd, check=True, env=one_env, cwd=ROOT, capture_output=True)
    two = tmp_path / "two"
    cmd, two_env = _recording(_train_cmd(two, data, ["--max_steps", "10", "--save_steps", "0", "--batch_size", "4",
                                                     *evals]), tmp_path / "two_batches", env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              os.path.join(ROOT, "configs", "accelerate", "cpu-2proc.yaml"), "-m", *cmd[2:]]
    # ACCELERATE_USE_CPU: accelerate launch does not pass the config's use_cpu on to torchrun's processes
    res = subprocess.run(launch, env={**two_env, "ACCELERATE_USE_CPU": "true"}, cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(_losses(one)) == sorted(_losses(two)) == list(range(1, 11))
    # the sharding, read off the batches each process collated (the loss tolerances below could not tell
    # two processes reading the same records from two reading disjoint halves)
    check_sharding(tmp_path / "one_batches", tmp_path / "two_batches", 10, 4, 42)
    # Same data in the same global batches, the same condition dropout (a function of the sample index).
    # What differs: the diffusion noise (each process has its own RNG stream; with 8 samples a step one
    # step's image loss can move by a fifth) and the text loss being averaged per process.
    for key, mean_tol, max_tol in (("text_loss", 0.05, 0.12), ("loss", 0.10, 0.30)):
        a, b = _losses(one, key), _losses(two, key)
        diffs = [abs(a[s] - b[s]) / a[s] for s in a]
        assert np.mean(diffs) < mean_tol and max(diffs) < max_tol, (key, diffs)
    # the eval sees every held-out record once whatever the number of processes: the same text loss up to
    # the weights' difference (the training text loss's tolerance)
    a, b = _losses(one, "eval_text_loss"), _losses(two, "eval_text_loss")
    assert sorted(a) == sorted(b) == [5, 10]
    assert all(abs(a[s] - b[s]) / a[s] < 0.12 for s in a), (a, b)
    assert _losses(one, "eval_bad_records") == _losses(two, "eval_bad_records") == {5: 2, 10: 2}  # summed


def test_real_scale_recipe_with_tiny_stand_ins(tmp_path, chat_jsonl):
    """configs/qwen-sdvae-lora.yaml with a tiny Qwen2 backbone and a tiny AutoencoderKL saved locally."""
    import yaml
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmar.datasets.digits import all_texts
    from mmar.tokenizers import train_bpe_tokenizer

    tok = train_bpe_tokenizer(all_texts() + ["which digit is this?", "user", "assistant"], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # a ChatML tokenizer
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "vae")
    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs", "qwen-sdvae-lora.yaml")))
    image = recipe["modalities"]["image"]
    image["tokenizer"].update(vae_path=str(tmp_path / "vae"), image_size=16, patch_size=2)
    image["head"].update(width=32, depth=1)
    recipe.update(backbone_path=str(tmp_path / "qwen"), data_files=str(chat_jsonl), output_dir=str(tmp_path / "run"),
                  max_steps=3, batch_size=4, gradient_accumulation_steps=1, mixed_precision="no", log_with=None,
                  max_length=128, warmup_steps=1, save_steps=0, progress=False)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    run = tmp_path / "run"
    assert (run / "adapter_config.json").exists() and (run / "base" / "model.safetensors").exists()
    assert (run / "image_tokenizer" / "vae" / "diffusion_pytorch_model.safetensors").exists()
    base = MMARModel.from_pretrained(run / "base")
    assert base.config.backbone_config.model_type == "qwen2"
    assert MMARProcessor.from_pretrained(run).chat is not None  # turns laid out with ChatML markers
    assert base.config.modalities["image"].token_dim == 16  # 2x2 patches of 4 latent channels
    assert main(["merge-lora", "--adapter", str(run), "--output", str(tmp_path / "merged")]) == 0
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(tmp_path / "merged")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("draw a 3", mode="image", max_items=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0][0].size == (16, 16)


def test_ema_is_saved_as_the_final_model(tmp_path, tiny_dir, chat_jsonl):
    """--ema_decay 0.5 over 3 steps: the saved model is the decayed average of the raw weights after each
    step, computed by hand (the first update copies: 0.25 w1 + 0.25 w2 + 0.5 w3); the raw weights are read
    from the step-1 and step-2 checkpoints and from the same run without EMA (EMA does not touch training).
    A run resumed from the step-2 checkpoint saves the same EMA (it is restored, not restarted)."""
    from safetensors.torch import load_file

    def train(out, *extra):
        assert main(["train", "--init_from", str(tiny_dir), "--dataset", "jsonl", "--data_files", str(chat_jsonl),
                     "--max_steps", "3", "--batch_size", "8", "--output_dir", str(out), "--progress", "false",
                     *extra]) == 0
        return load_file(out / "model.safetensors")

    ema = train(tmp_path / "ema", "--ema_decay", "0.5", "--save_steps", "1")
    w1, w2 = (load_file(tmp_path / "ema" / "checkpoints" / f"step_{k}" / "model.safetensors") for k in (1, 2))
    w3 = train(tmp_path / "raw", "--save_steps", "0")
    assert set(ema) == set(w3)
    moved = 0
    for k, v in ema.items():
        torch.testing.assert_close(v, 0.25 * w1[k] + 0.25 * w2[k] + 0.5 * w3[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.allclose(w1[k], w3[k])
    assert moved > len(ema) // 2  # the weights did move, so the average is not trivially any one of them
    assert any(not torch.allclose(ema[k], w3[k], atol=1e-5) for k in ema)  # and the EMA is not the raw model
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ema" / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    again = train(resumed, "--ema_decay", "0.5", "--save_steps", "1", "--resume_from_checkpoint", "latest")
    for k, v in ema.items():
        torch.testing.assert_close(again[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the model loaded from the output directory is the EMA, not the raw weights
    loaded = MMARModel.from_pretrained(tmp_path / "ema").state_dict()
    assert set(ema) <= set(loaded)
    for k, v in ema.items():
        assert torch.equal(loaded[k], v), k
    assert any(not torch.allclose(loaded[k], w3[k], atol=1e-5) for k in ema)


def test_streamed_jsonl_trains_and_resumes_mid_epoch(tmp_path, tiny_dir, chat_jsonl):
    """--streaming true: records come through HF datasets' IterableDataset (shuffle buffer, one order per
    epoch); bad records are skipped and counted; resuming from a mid-epoch checkpoint gives the same losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = {"model": tiny_dir, "jsonl": chat_jsonl}
    stream = ["--streaming", "true", "--shuffle_buffer", "16", "--save_steps", "3", "--save_total_limit", "10"]
    full = tmp_path / "full"
    res = subprocess.run(_train_cmd(full, data, stream), env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "streamed samples" in res.stdout and "skipped 2 bad sample(s)" in res.stdout, res.stdout
    a = _losses(full)
    assert sorted(a) == list(range(1, 21))
    assert sum(a[s] for s in range(16, 21)) < sum(a[s] for s in range(1, 6))  # it learns
    # 42 records, batch 8: 5 batches an epoch, so step 12 is two batches into the third epoch
    state = json.loads((full / "checkpoints" / "step_12" / "trainer_state.json").read_text())
    assert {k: state[k] for k in ("step", "epoch", "batches")} == {"step": 12, "epoch": 2, "batches": 2}
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_12", resumed / "checkpoints" / "step_12")
    res = subprocess.run(_train_cmd(resumed, data, [*stream, "--resume_from_checkpoint", "latest"]), env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    b = _losses(resumed)
    assert sorted(b) == list(range(13, 21))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), step


def test_streamed_epochs_are_shuffled_differently(chat_jsonl):
    from mmar.training.jsonl import StreamingChatDataset

    ds = StreamingChatDataset(str(chat_jsonl), seed=0, shuffle_buffer=16)
    orders = []
    for epoch in (0, 1, 0):
        ds.epoch = epoch
        orders.append([str(s)[:60] for _, s in ds])
    assert len(orders[0]) == 42 and orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1])
    with pytest.raises(FileNotFoundError, match="gone.jsonl: data file not found"):
        StreamingChatDataset(str(chat_jsonl.parent / "gone.jsonl"))
