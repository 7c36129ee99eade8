"""--gradient_checkpointing: the backbone's decoder layers and the heads' denoiser blocks are recomputed in the
backward pass (checked by counting their forward calls), and training gives the losses and gradients of
the model without it, in full and under LoRA."""

import copy
import json

import pytest
import torch

from mmar.cli import main
from mmar.datasets import DigitsDataset
from mmar.training.lora import apply_lora
from mmar.training.trainer import enable_checkpointing
from tests.conftest import TINY_MODALITIES, make_tiny


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))  # (recomputation may stop before a module returns)
    return calls


def _train(model, batches, steps_seed=0):
    """A few AdamW steps; the losses and the gradients of every step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(steps_seed + i)  # the heads' noise and timesteps, the same draws in both models
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _compare(plain, ckpt, batches):
    inner = ckpt.get_base_model() if hasattr(ckpt, "get_base_model") else ckpt  # under peft: the MMARModel
    layer_mlp = _count_calls(inner.backbone.model.layers[0].mlp)
    head_ada = _count_calls(inner.heads["image"].net.blocks[0].ada)
    (la, ga), (lb, gb) = _train(plain, batches), _train(ckpt, batches)
    assert len(layer_mlp) == len(head_ada) == 2 * len(batches)  # forward + recompute in backward, every step
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    for step, (a, b) in enumerate(zip(ga, gb)):
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (step, name)


@pytest.mark.parametrize("head", ["diffusion", "flow"])
def test_checkpointing_gives_the_same_losses_and_gradients(head):
    modalities = copy.deepcopy(TINY_MODALITIES)
    modalities["image"]["head"]["name"] = head
    model, proc = make_tiny(modalities=modalities)
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    assert enable_checkpointing(ckpt) == (2, 2)  # two decoder layers, two head blocks
    ds = DigitsDataset()
    batches = [proc([ds[i] for i in range(k, k + 8)]) for k in (0, 8, 16)]
    _compare(plain, ckpt, batches)
    with torch.no_grad():  # evaluation runs the plain path: nothing to recompute
        losses = []
        for m in (ckpt.eval(), plain.eval()):
            torch.manual_seed(0)
            losses.append(m(**batches[0]).loss)
        assert torch.allclose(*losses)


def test_checkpointing_under_lora_gives_the_same_losses_and_gradients(tiny):
    model, proc = tiny
    torch.manual_seed(0)  # the same random lora_A in both
    plain = apply_lora(copy.deepcopy(model), {"r": 4, "alpha": 8})
    base = copy.deepcopy(model)
    enable_checkpointing(base)  # before the adapters, as the trainer does
    torch.manual_seed(0)
    ckpt = apply_lora(base, {"r": 4, "alpha": 8})
    ds = DigitsDataset()
    batches = [proc([ds[i] for i in range(k, k + 8)]) for k in (0, 8, 16)]
    _compare(plain, ckpt, batches)
    _, grads = _train(copy.deepcopy(ckpt), batches[:1])
    lora_b = [g for n, g in grads[0].items() if "lora_B" in n]  # (lora_A's are 0 while B starts at 0)
    assert len(lora_b) > 4 and all(g.abs().sum() > 0 for g in lora_b)  # the frozen base passes gradients


def test_cli_gradient_checkpointing_trains_lora_to_the_same_losses(tmp_path, tiny_dir, chat_jsonl, capsys):
    def run(name, *extra):
        out = tmp_path / name
        assert main(["train", "--init_from", str(tiny_dir), "--dataset", "jsonl", "--data_files", str(chat_jsonl),
                     "--lora", "{r: 4, alpha: 8}", "--max_steps", "4", "--batch_size", "8", "--logging_steps", "1",
                     "--save_steps", "0", "--warmup_steps", "1", "--output_dir", str(out), "--progress", "false",
                     *extra]) == 0
        return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    plain = run("plain")
    ckpt = run("ckpt", "--gradient_checkpointing", "true")
    assert "gradient checkpointing: 2 decoder layers, 2 head blocks" in capsys.readouterr().out
    assert len(ckpt) == 4 and ckpt == pytest.approx(plain, rel=1e-4, abs=1e-6)
