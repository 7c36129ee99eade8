"""Per-token flow-matching head: rectified flow with a few Euler steps.

The same network as the diffusion head (MAR's ``SimpleMLPAdaLN``: a residual MLP modulated by AdaLN with
the projected backbone state + a time embedding) learns the velocity of the straight path between a
token ``x0`` and Gaussian noise::

    x_t = (1 - t) * x0 + t * noise,      target v = noise - x0,      t in [0, 1]

Training draws ``t`` logit-normal (SD3) or uniform; sampling integrates ``dx/dt = v`` from ``t = 1``
(noise) to ``t = 0`` with ``num_inference_steps`` Euler steps. Classifier-free guidance mixes the two
branches' velocities, ``u + s * (c - u)``, on the same ``x_t`` (the diffusion head's convention).
"""

from __future__ import annotations

import torch

from .base import register_head
from .continuous import ContinuousHead

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the range the sinusoidal features were made for
TIME_SAMPLING = ("logit_normal", "uniform")


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``s t / (1 + (s - 1) t)``: ``shift`` > 1 spends more steps near the noise."""
    return shift * t / (1 + (shift - 1) * t)


@register_head("flow")
class FlowHead(ContinuousHead):
    def __init__(self, token_dim: int, cond_dim: int, width: int = 256, depth: int = 3,
                 diffusion_batch_mul: int = 4, time_sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0, num_inference_steps: int = 8):
        """``diffusion_batch_mul``: noise draws per token in training (the diffusion head's name, so a
        config switches heads by changing ``name`` only). ``shift`` > 1 warps the sampling time grid
        towards the noisy end (``t' = s t / (1 + (s - 1) t)``, SD3); 1 keeps it uniform."""
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}")
        if num_inference_steps < 1 or shift <= 0:
            raise ValueError(f"need num_inference_steps >= 1 and shift > 0, got {num_inference_steps}, {shift}")
        super().__init__(token_dim, cond_dim, width, depth, diffusion_batch_mul)
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.shift, self.num_inference_steps = shift, num_inference_steps

    # -- training ------------------------------------------------------------------------------
    def sample_time(self, n: int, device) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    def loss(self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the predicted velocity, ``diffusion_batch_mul`` (t, noise) draws per token."""
        cond, x0 = self.draws(cond, target)
        t = self.sample_time(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        tt = t.to(x0.dtype)[:, None]
        xt = torch.lerp(x0, noise, tt)  # (1 - t) x0 + t noise
        pred = self.net(xt, t * TIME_SCALE, cond)
        return (pred.float() - (noise - x0).float()).pow(2).mean()

    # -- sampling ------------------------------------------------------------------------------
    def time_grid(self, steps: int, device=None) -> torch.Tensor:
        """``steps + 1`` times from 1 (noise) down to 0 (data)."""
        return shifted(torch.linspace(1.0, 0.0, steps + 1, device=device), self.shift)

    def integrate(self, cond: torch.Tensor, uncond, guidance: tuple[float, float | None], temperature: float,
                  steps: int, generator) -> torch.Tensor:
        """Euler integration of the learned velocity from ``t = 1`` (noise) to ``t = 0``."""
        ts = self.time_grid(steps, cond.device)
        x = self.initial_noise(cond, generator, temperature)
        mods, branches = self.step_modulations(cond, uncond, ts[:-1] * TIME_SCALE)
        dts = (ts[1:] - ts[:-1]).tolist()  # negative: t runs from 1 to 0
        for i, dt in enumerate(dts):
            x = torch.add(x, self.guided_output(x, mods[i], branches, guidance), alpha=dt)
        return x
