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
from functools import partial

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as hf_init

from .base import Head, register_head
from .guidance import guidance_rows, guide

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


@register_head("diffusion")
class DiffusionHead(Head):
    unsaved_options = ("eta",)  # never written into a config by default (saved configs have no eta)

    def __init__(self, token_dim: int, cond_dim: int, width: int = 256, depth: int = 3,
                 prediction_type: str = "v_prediction", num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2", diffusion_batch_mul: int = 4,
                 scheduler: str = "DDIMScheduler", num_inference_steps: int = 50, eta: float = 0.0):
        """These defaults are the head's default config (:func:`mmar.heads.head_defaults`). ``width`` /
        ``depth``: the MLP width and residual AdaLN blocks of ``SimpleMLPAdaLN``; ``prediction_type``:
        ``v_prediction`` or ``epsilon``; ``beta_schedule``: cosine, as in MAR; ``diffusion_batch_mul``: noise
        draws per token in training; ``scheduler``: any diffusers scheduler class name for sampling;
        ``eta``: DDIM's stochasticity (0: deterministic)."""
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
        self._linear_steps: dict[tuple, list[tuple[float, float]]] = {}

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

    def linear_steps(self, sched, name: str) -> list[tuple[float, float]] | None:
        """For a deterministic DDIM sampler (``eta = 0``, no clipping or thresholding) each step is
        ``x_prev = a * x + b * model_output`` with ``(a, b)`` depending only on the timestep: read them off
        diffusers' own ``step`` once (two probes per timestep), cache them, and let sampling skip the
        scheduler's per-step Python. ``None`` for any other sampler (it then runs ``step`` as usual)."""
        cfg = sched.config
        if not isinstance(sched, DDIMScheduler) or self.eta != 0 or cfg.clip_sample or cfg.thresholding:
            return None
        key = (name, len(sched.timesteps), tuple(int(t) for t in sched.timesteps[:2]))
        if key not in self._linear_steps:
            one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
            self._linear_steps[key] = [(float(sched.step(zero, t, one, eta=0.0).prev_sample),
                                        float(sched.step(one, t, zero, eta=0.0).prev_sample))
                                       for t in sched.timesteps]
        return self._linear_steps[key]

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
               scheduler: str | None = None, image_guidance_scale: float | None = None) -> torch.Tensor:
        """Draw one token per row of ``cond``.

        With ``uncond`` (the unconditional branch's hidden states), classifier-free guidance
        mixes the two predictions, ``u + s * (c - u)``, computed on the same noisy sample; with
        ``uncond = (image_only, none)`` dual guidance adds ``image_guidance_scale`` (:mod:`.guidance`).
        ``temperature`` scales the initial noise (and the per-step noise of stochastic samplers).
        ``generator`` may be a list with one generator per row (diffusers' convention).
        """
        sched = self.sampler(scheduler)
        sched.set_timesteps(num_inference_steps or self.num_inference_steps, device=cond.device)
        linear = self.linear_steps(sched, scheduler or self.scheduler_name)
        n, dtype = cond.shape[0], cond.dtype
        x = randn_tensor((n, self.token_dim), generator=generator, device=cond.device, dtype=dtype)
        x = x * temperature * sched.init_noise_sigma
        rows, branches = guidance_rows(cond, uncond)
        c = self.net.cond_embed(rows)
        # every step's AdaLN modulations in one batched call per layer: [steps, rows, ...]
        steps = sched.timesteps.to(cond.device)
        t_emb = self.net.time_embed(timestep_features(steps).to(c.dtype))
        mods = self.net.per_step(self.net.modulations(t_emb[:, None, :] + c[None]))
        step_params = inspect.signature(sched.step).parameters
        for i, t in enumerate(sched.timesteps):
            xin = x.repeat(branches, 1) if branches > 1 else x
            xin = xin if linear else sched.scale_model_input(xin, t)  # DDIM's is the identity
            out = guide(self.net.denoise(xin, mods[i]), branches, guidance_scale, image_guidance_scale)
            if linear:
                a, b = linear[i]
                x = torch.add(x * a, out, alpha=b)
                continue
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
