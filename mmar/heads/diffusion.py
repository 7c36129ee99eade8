"""Per-token diffusion head (MAR's ``DiffLoss`` / ``SimpleMLPAdaLN``).

A small residual MLP, modulated by AdaLN with the condition (projected backbone
hidden state + timestep embedding), denoises one continuous token (the network and
what the continuous heads share: :mod:`.continuous`). Noise schedule, training
targets and the sampling loop come from diffusers schedulers; v-prediction by
default (MMAR, Orthus), epsilon selectable.
"""

from __future__ import annotations

import copy
import inspect

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .base import register_head
from .continuous import FREQ_DIM, ContinuousHead, ResBlock, SimpleMLPAdaLN, timestep_features

__all__ = ["FREQ_DIM", "DiffusionHead", "ResBlock", "SimpleMLPAdaLN", "timestep_features"]  # the network's old home


@register_head("diffusion")
class DiffusionHead(ContinuousHead):
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
        if prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {prediction_type!r}")
        super().__init__(token_dim, cond_dim, width, depth, diffusion_batch_mul)
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
        cond, target = self.draws(cond, target)
        sched = self.train_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        noisy = sched.add_noise(target, noise, t)
        pred = self.net(noisy, t, cond)
        goal = sched.get_velocity(target, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        return (pred.float() - goal.float()).pow(2).mean()

    # -- sampling ------------------------------------------------------------------------------
    def integrate(self, cond: torch.Tensor, uncond, guidance: tuple[float, float | None], temperature: float,
                  steps: int, generator, scheduler: str | None = None) -> torch.Tensor:
        """The scheduler's loop (``scheduler``: another diffusers class for this call); ``temperature`` also
        scales the per-step noise of stochastic samplers. A deterministic DDIM runs the cached linear steps."""
        sched = self.sampler(scheduler)
        sched.set_timesteps(steps, device=cond.device)
        linear = self.linear_steps(sched, scheduler or self.scheduler_name)
        x = self.initial_noise(cond, generator, temperature) * sched.init_noise_sigma
        mods, branches = self.step_modulations(cond, uncond, sched.timesteps.to(cond.device))
        step_params = inspect.signature(sched.step).parameters
        for i, t in enumerate(sched.timesteps):
            # DDIM's input scaling is the identity
            out = self.guided_output(x, mods[i], branches, guidance,
                                     None if linear else lambda xin, t=t: sched.scale_model_input(xin, t))
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
