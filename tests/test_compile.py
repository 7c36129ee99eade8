"""--torch_compile: the backbone's decoder layers compiled in place (inductor, on CPU here) give the
eager model's loss and gradients, and keep the module tree and state-dict names."""

import copy

import torch

from mmar.datasets import DigitsDataset
from mmar.training.arguments import TrainingArguments
from mmar.training.trainer import compile_blocks


def test_compiled_layers_give_the_eager_loss_and_gradients(tiny):
    model, proc = tiny
    eager = copy.deepcopy(model).train()
    compiled = copy.deepcopy(model).train()
    names = list(compiled.state_dict())
    assert compile_blocks(compiled) == compiled.config.backbone_config.num_hidden_layers
    assert list(compiled.state_dict()) == names  # checkpoints, LoRA and saving see the same names
    ds = DigitsDataset()
    for first in (0, 8):  # two batch shapes: one dynamic graph serves both
        batch = proc([ds[i] for i in range(first, first + 8)])
        losses = []
        for m in (eager, compiled):
            torch.manual_seed(0)  # the diffusion head's noise, drawn eagerly in both
            loss = m(**batch).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses
        for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
        eager.zero_grad()
        compiled.zero_grad()
    assert TrainingArguments().torch_compile is False  # opt-in
