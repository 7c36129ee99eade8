"""What the continuous heads (diffusion, flow, few-step) share: the network and a base class.

The network is MAR's ``SimpleMLPAdaLN``: a small residual MLP whose blocks are modulated by AdaLN with the
condition embedding (the projected backbone hidden state plus an embedding of the time / noise level).
:class:`ContinuousHead` holds one and does what every head that turns noise into a token does the same way:
``diffusion_batch_mul`` draws per token in training, the initial noise (scaled by the temperature; one
``torch.Generator`` per row allowed, diffusers' ``randn_tensor``), the condition embedding of every guidance
branch with the per-step modulations computed at once, classifier-free guidance over the branches
(:mod:`.guidance`) and ``sample``'s signature. A subclass writes its training target and its sampling
loop (``integrate``): the time grid and the update of ``x`` per step.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as hf_init

from .base import Head
from .guidance import guidance_rows, guide

FREQ_DIM = 256  # sinusoidal timestep features, as in DiT / MAR
MAX_PERIOD = 10_000


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features ``[n, dim]`` of times / noise levels ``t`` ``[n]`` (DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """One residual block: LayerNorm -> AdaLN modulation -> MLP, gated (applied by ``denoise``)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser. ``gradient_checkpointing`` (set with the rest of the model by transformers'
    ``activation_checkpointing_enable``) recomputes each block in the backward pass: a training batch runs
    ``diffusion_batch_mul`` rows per token, so without it the head keeps ~10 width-sized activations per
    row and block."""

    gradient_checkpointing = False

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.init_own_weights()

    def init_own_weights(self) -> None:
        """Zero the modulations and the output layer, so the head starts as the identity residual. Called
        here and again by ``MMARModel`` after transformers' default init (which would redraw every Linear);
        ``transformers.initialization`` leaves weights that were loaded from a checkpoint alone."""
        for ada in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            hf_init.zeros_(ada.weight)
            hf_init.zeros_(ada.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(timestep_features(t).to(x.dtype)) + self.cond_embed(cond)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self.denoise_checkpointed(x, y)
        return self.denoise(x, self.modulations(y))

    @staticmethod
    def modulation(ada: nn.Module, y: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """One AdaLN modulation ``(shift, 1 + scale[, gate])`` from condition embeddings ``y``."""
        chunks = list(ada(y).chunk(parts, dim=-1))
        chunks[1] = chunks[1] + 1
        return tuple(chunks)

    def modulations(self, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The AdaLN ``(shift, 1 + scale, gate)`` of every block (and ``(shift, 1 + scale)`` of the final
        norm) for condition embeddings ``y`` ``[..., width]``; in sampling they are computed for all steps
        at once, since the condition does not change."""
        return [self.modulation(b.ada, y, 3) for b in self.blocks] + [self.modulation(self.final_ada, y, 2)]

    def block(self, block: ResBlock, x: torch.Tensor, shift, scale1p, gate) -> torch.Tensor:
        """One residual block on ``x`` with its modulation."""
        h = F.layer_norm(x, (x.shape[-1],), block.norm.weight, block.norm.bias, block.norm.eps)
        fc1, fc2 = block.mlp[0], block.mlp[2]
        h = F.linear(F.silu(F.linear(torch.addcmul(shift, h, scale1p), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        return torch.addcmul(x, gate, h)

    def head_out(self, x: torch.Tensor, shift, scale1p) -> torch.Tensor:
        """The final modulated norm and output layer."""
        h = torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), None, None, self.final_norm.eps), scale1p)
        return F.linear(h, self.out.weight, self.out.bias)

    def denoise_checkpointed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``denoise(x, modulations(y))`` keeping only each block's input: every block (its modulation
        included) and the output are recomputed in the backward pass. The same operations, so the same
        numbers."""
        ckpt = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)

        def run_block(block, x, y):
            return self.block(block, x, *self.modulation(block.ada, y, 3))

        x = F.linear(x, self.input_proj.weight, self.input_proj.bias)
        for block in self.blocks:
            x = ckpt(run_block, block, x, y)
        return ckpt(lambda x, y: self.head_out(x, *self.modulation(self.final_ada, y, 2)), x, y)

    @staticmethod
    def per_step(mods: list[tuple[torch.Tensor, ...]]) -> list[list[tuple[torch.Tensor, ...]]]:
        """Modulations computed for all steps at once (``[steps, rows, width]`` each) -> one list per step,
        split with one ``unbind`` per tensor instead of an indexing op per step."""
        split = [tuple(p.unbind(0) for p in m) for m in mods]
        return [[tuple(p[i] for p in m) for m in split] for i in range(mods[0][0].shape[0])]

    def denoise(self, x: torch.Tensor, mods: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The network body, written with functional ops: sampling calls it once per step for a few rows,
        where module-call overhead would cost more than the arithmetic."""
        x = F.linear(x, self.input_proj.weight, self.input_proj.bias)
        for block, mod in zip(self.blocks, mods):
            x = self.block(block, x, *mod)
        return self.head_out(x, *mods[-1])


class ContinuousHead(Head):
    """A head drawing one continuous token of ``token_dim`` values per row from noise with a
    :class:`SimpleMLPAdaLN` of ``width`` and ``depth``."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, diffusion_batch_mul: int = 1):
        super().__init__()
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, depth)
        self.batch_mul = diffusion_batch_mul

    # -- training ------------------------------------------------------------------------------
    def draws(self, cond: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond`` and ``target`` repeated ``diffusion_batch_mul`` times: one noise draw per copy."""
        return cond.repeat(self.batch_mul, 1), target.repeat(self.batch_mul, 1)

    # -- sampling ------------------------------------------------------------------------------
    def initial_noise(self, cond: torch.Tensor, generator, temperature: float = 1.0) -> torch.Tensor:
        """``[rows, token_dim]`` Gaussian noise times ``temperature``; ``generator`` may be a list with one
        generator per row (diffusers' convention), so a row draws the same alone as in a batch."""
        return temperature * randn_tensor((cond.shape[0], self.token_dim), generator=generator,
                                          device=cond.device, dtype=cond.dtype)

    def step_modulations(self, cond: torch.Tensor, uncond, times: torch.Tensor) -> tuple[list, int]:
        """Every step's AdaLN modulations for the network's time input ``times`` ``[steps]`` and every
        guidance branch's condition (:func:`.guidance.guidance_rows`), and the number of branches. The
        condition is fixed during sampling, so each layer's modulations of all steps are one batched call."""
        rows, branches = guidance_rows(cond, uncond)
        c = self.net.cond_embed(rows)
        t_emb = self.net.time_embed(timestep_features(times).to(c.dtype))
        return self.net.per_step(self.net.modulations(t_emb[:, None, :] + c[None])), branches

    def guided_output(self, x: torch.Tensor, mods: list, branches: int, guidance: tuple[float, float | None],
                      scale_input=None) -> torch.Tensor:
        """The network's output at ``x`` (``[rows, token_dim]``) with one step's modulations, each branch on
        the same ``x`` (``scale_input``: the scheduler's input scaling), combined by :func:`.guidance.guide`
        with ``guidance = (guidance_scale, image_guidance_scale)``."""
        xin = x.repeat(branches, 1) if branches > 1 else x
        if scale_input is not None:
            xin = scale_input(xin)
        return guide(self.net.denoise(xin, mods), branches, *guidance)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
               temperature: float = 1.0, num_inference_steps: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               image_guidance_scale: float | None = None, **options) -> torch.Tensor:
        """Draw one token per row of ``cond`` in ``num_inference_steps`` steps (default: the head's).

        With ``uncond`` (the unconditional branch's hidden states), classifier-free guidance mixes the two
        branches' outputs, ``u + s * (c - u)``, computed on the same noisy sample; with ``uncond =
        (image_only, none)`` dual guidance adds ``image_guidance_scale`` (:mod:`.guidance`). ``temperature``
        scales the initial noise. ``generator`` may be a list with one generator per row (diffusers'
        convention). ``options``: the subclass's own (the diffusion head's ``scheduler``).
        """
        return self.integrate(cond, uncond, (guidance_scale, image_guidance_scale), temperature,
                              num_inference_steps or self.num_inference_steps, generator, **options)

    def integrate(self, cond: torch.Tensor, uncond, guidance: tuple[float, float | None], temperature: float,
                  steps: int, generator, **options) -> torch.Tensor:
        """The sampling loop: noise to token in ``steps`` steps."""
        raise NotImplementedError
