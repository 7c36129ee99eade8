"""Per-token diffusion head (MAR's ``DiffLoss`` / ``SimpleMLPAdaLN``).

A small residual MLP, modulated by AdaLN with the condition (projected backbone
hidden state + timestep embedding), denoises one continuous token. Noise
schedule, training targets and the sampling loop come from diffusers
schedulers; v-prediction by default (MMAR, Orthus), epsilon selectable.
"""

from __future__ import annotations

import copy
import inspect
import math

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .base import Head, register_head

FREQ_DIM = 256  # sinusoidal timestep features, as in DiT / MAR
MAX_PERIOD = 10_000


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """One residual block: LayerNorm -> AdaLN modulation -> MLP, gated (applied by ``denoise``)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.zero_init()

    def zero_init(self) -> None:
        """Zero the modulations and the output layer, so the head starts as the identity residual."""
        for ada in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, self.modulations(self.time_embed(timestep_features(t).to(x.dtype))
                                                + self.cond_embed(cond)))

    def modulations(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The AdaLN shift / scale / gate of every block for condition embeddings ``y`` ``[..., width]``;
        in sampling they are computed for all steps at once, since the condition does not change."""
        return [block.ada(y) for block in self.blocks] + [self.final_ada(y)]

    def denoise(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        x = self.input_proj(x)
        for block, mod in zip(self.blocks, mods):
            shift, scale, gate = mod.chunk(3, dim=-1)
            x = x + gate * block.mlp(modulate(block.norm(x), shift, scale))
        shift, scale = mods[-1].chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(x), shift, scale))


@register_head("diffusion")
class DiffusionHead(Head):
    def __init__(self, token_dim: int, cond_dim: int, width: int = 256, depth: int = 3,
                 prediction_type: str = "v_prediction", num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2", diffusion_batch_mul: int = 4,
                 scheduler: str = "DDIMScheduler", num_inference_steps: int = 50, eta: float = 0.0):
        super().__init__()
        if prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {prediction_type!r}")
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, depth)
        self.batch_mul = diffusion_batch_mul
        self.num_inference_steps, self.eta = num_inference_steps, eta
        self.schedule = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                             prediction_type=prediction_type, clip_sample=False)
        self.scheduler_name = scheduler
        self._samplers: dict[str, object] = {}

    @property
    def train_scheduler(self) -> DDPMScheduler:
        """Built on first use, on the CPU (the model itself may be created on the meta device)."""
        if "_train" not in self._samplers:
            with torch.device("cpu"):
                self._samplers["_train"] = DDPMScheduler(**self.schedule)
        return self._samplers["_train"]

    def sampler(self, name: str | None = None):
        """A fresh diffusers scheduler of class ``name`` sharing the training noise schedule (schedulers
        keep per-call state in ``set_timesteps``, so each sampling call gets its own copy: thread-safe)."""
        name = name or self.scheduler_name
        if name not in self._samplers:
            cls = getattr(diffusers, name, None)
            if cls is None or not hasattr(cls, "step"):
                raise ValueError(f"{name!r} is not a diffusers scheduler class")
            with torch.device("cpu"):
                self._samplers[name] = cls.from_config(self.train_scheduler.config)
        return copy.deepcopy(self._samplers[name])

    # -- training ------------------------------------------------------------------------------
    def loss(self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the prediction, ``diffusion_batch_mul`` noise draws per token."""
        cond, target = cond.repeat(self.batch_mul, 1), target.repeat(self.batch_mul, 1)
        sched = self.train_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        noisy = sched.add_noise(target, noise, t)
        pred = self.net(noisy, t, cond)
        goal = sched.get_velocity(target, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        return (pred.float() - goal.float()).pow(2).mean()

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
               temperature: float = 1.0, num_inference_steps: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               scheduler: str | None = None) -> torch.Tensor:
        """Draw one token per row of ``cond``.

        With ``uncond`` (the unconditional branch's hidden states), classifier-free guidance
        mixes the two predictions, ``u + s * (c - u)``, computed on the same noisy sample.
        ``temperature`` scales the initial noise (and the per-step noise of stochastic samplers).
        ``generator`` may be a list with one generator per row (diffusers' convention).
        """
        sched = self.sampler(scheduler)
        sched.set_timesteps(num_inference_steps or self.num_inference_steps, device=cond.device)
        n, dtype = cond.shape[0], cond.dtype
        x = randn_tensor((n, self.token_dim), generator=generator, device=cond.device, dtype=dtype)
        x = x * temperature * sched.init_noise_sigma
        cfg = uncond is not None
        c = self.net.cond_embed(torch.cat([cond, uncond]) if cfg else cond)
        # every step's AdaLN modulations in one batched call per layer: [steps, rows, ...]
        steps = sched.timesteps.to(cond.device)
        t_emb = self.net.time_embed(timestep_features(steps).to(c.dtype))
        mods = self.net.modulations(t_emb[:, None, :] + c[None])
        step_params = inspect.signature(sched.step).parameters
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            out = self.net.denoise(xin, [m[i] for m in mods])
            if cfg:
                oc, ou = out.chunk(2)
                out = ou + guidance_scale * (oc - ou)
            kwargs = {}
            if "eta" in step_params:
                kwargs["eta"] = self.eta
                if self.eta > 0:
                    kwargs["variance_noise"] = temperature * randn_tensor(x.shape, generator=generator,
                                                                          device=x.device, dtype=x.dtype)
            elif "generator" in step_params:
                kwargs["generator"] = generator
            x = sched.step(out, t, x, **kwargs).prev_sample
        return x
