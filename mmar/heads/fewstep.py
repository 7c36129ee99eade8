"""Few-step head: a trained diffusion or flow head distilled into a 1-2-step flow map.

Method (``mmar distill-head``, :mod:`mmar.training.distill`). The teacher's deterministic sampler (DDIM
with ``eta = 0``, or the flow head's Euler steps) is an ODE solver, so with the backbone frozen it is a
*function* from (condition, noise) to a token. The student learns that function's flow map on a coarse
grid of the teacher's own times: from the teacher's state ``x_t`` at grid time ``t`` it jumps straight to
the state ``x_r`` at a later grid time ``r``,

    x_r = a(t, r) * x_t + b(t, r) * F(x_t, t, r, condition, w)

with ``(a, b)`` the teacher's own one-step update between ``t`` and ``r`` (DDIM from the cumulative alphas,
v- or epsilon-prediction; ``(1, r - t)`` for flow, where ``F`` is MeanFlow's average velocity). ``F`` is the
teacher's network (initialised from its weights) plus two zero-initialised embeddings, of the target time
``r`` and of the guidance scale ``w``: before training the student *is* the teacher run on the coarse grid,
and training regresses the teacher's many-step trajectory (states at the grid times, the endpoint in
particular) from the same noise. With ``steps = N`` every jump between the ``N + 1`` grid times is
trained, so the head samples in any 1..N network evaluations. Classifier-free guidance keeps the
teacher's form, ``u + w (c - u)`` of the two branches (one batched call), but the target is the *guided*
teacher trajectory, and ``w`` is an input, as in latent consistency models: the student learns the
guided map for the distilled scales instead of extrapolating a 1-step guess.

With ``embedded_guidance`` (``mmar distill-head --embedded_guidance true``) the student sees the
conditional branch alone, ``w`` still an input, and is trained on the same guided teacher trajectories:
guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; FLUX.1-dev's
guidance embedding). The unconditional branch's context (BOS and the item so far) is a part of the
conditional one's, so the guided map is a function of the conditional context; the sampler then runs no
unconditional copy of the sequence for this head (``needs_guidance_branch``), which halves the backbone's
rows under CFG, the cost a 1-step head leaves.

Why this and not consistency distillation, shortcut models or MeanFlow training: those exist because the
teacher's full trajectory is too expensive to compute for every training example of a large image
model, so they bootstrap from one teacher step (consistency distillation: errors compound along the
chain, an EMA target, careful discretisation schedules) or from the model's own smaller steps (shortcut /
MeanFlow: trained from scratch, a Jacobian-vector product or self-consistency target). A per-token head
is the opposite case: a token has 4-16 numbers and the head is a small MLP, so the teacher's 50-step
trajectories for tens of thousands of (condition, noise) pairs cost minutes on a CPU. Regressing the
exact ODE map is then the unbiased, most direct objective (Luhman & Luhman's knowledge distillation; the
Distilled Decoding paper distils the same noise-to-token map of AR models for one- or two-step
generation), its hard part on large images (a very high-dimensional map) does not arise for one token,
and initialising from the teacher makes it a short fine-tune. The flow-map parametrisation (MeanFlow's
``x_r = x_t + (r - t) u``) is what lets one network take 1 or 2 steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from transformers import initialization as hf_init

from .base import Head, register_head, signature_defaults
from .continuous import FREQ_DIM, ContinuousHead, timestep_features
from .diffusion import DiffusionHead
from .flow import TIME_SCALE, FlowHead, shifted
from .guidance import guidance_rows, guide

GUIDE_SCALE = 100.0  # a guidance scale w is embedded as w * 100 (the sinusoidal features' useful range)
TEACHERS = ("diffusion", "flow")


def _embedding(width: int) -> nn.Sequential:
    """Sinusoidal features -> width; :meth:`FewStepHead.init_own_weights` zeroes its last layer, so adding
    it changes nothing until trained."""
    return nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))


class TeacherSchedule:
    """The teacher's sampler as states ``0..T`` (state ``i`` is the input of step ``i``, state ``T`` the
    token): the network's time input at each state and the one-step update ``x_r = a x_t + b out``
    between any two states, computed in closed form from the teacher's settings."""

    def __init__(self, teacher: dict, teacher_steps: int):
        if teacher.get("name") not in TEACHERS:
            raise ValueError(f"a few-step head distils a {' or '.join(TEACHERS)} head, not {teacher.get('name')!r}")
        self.kind, self.steps = teacher["name"], teacher_steps
        spec = {**signature_defaults(DiffusionHead if self.kind == "diffusion" else FlowHead), **teacher}
        self.width, self.depth = spec["width"], spec["depth"]
        if self.kind == "flow":
            ts = torch.linspace(1.0, 0.0, teacher_steps + 1, dtype=torch.float64)
            ts = shifted(ts, spec["shift"])  # FlowHead.time_grid
            self.times, self._t = (ts * TIME_SCALE).tolist(), ts.tolist()
            return
        if spec["scheduler"] != "DDIMScheduler" or spec["eta"] != 0:
            raise ValueError("distillation needs the teacher's deterministic sampler: a diffusion head with "
                             f"scheduler DDIMScheduler and eta 0 (got {spec['scheduler']}, eta {spec['eta']})")
        self.prediction = spec["prediction_type"]
        with torch.device("cpu"):
            sched = DDIMScheduler.from_config(DDPMScheduler(
                num_train_timesteps=spec["num_train_timesteps"], beta_schedule=spec["beta_schedule"],
                prediction_type=spec["prediction_type"], clip_sample=False).config)
        sched.set_timesteps(teacher_steps)
        ts = [int(t) for t in sched.timesteps]
        ratio = sched.config.num_train_timesteps // teacher_steps
        acp = sched.alphas_cumprod.double()
        self.times = [float(t) for t in ts] + [float(ts[-1] - ratio)]
        self._acp = [float(acp[t]) for t in ts] + [float(acp[ts[-1] - ratio]) if ts[-1] - ratio >= 0
                                                   else float(sched.final_alpha_cumprod)]

    def coef(self, i: int, j: int) -> tuple[float, float]:
        """``(a, b)`` of the teacher's update from state ``i`` straight to state ``j``."""
        if self.kind == "flow":
            return 1.0, self._t[j] - self._t[i]
        at, ar = self._acp[i] ** 0.5, self._acp[j] ** 0.5
        st, sr = (1 - self._acp[i]) ** 0.5, (1 - self._acp[j]) ** 0.5
        if self.prediction == "v_prediction":  # x0 = a_t x - s_t v, eps = s_t x + a_t v
            return ar * at + sr * st, sr * at - ar * st
        return ar / at, sr - ar * st / at  # epsilon: x0 = (x - s_t eps) / a_t


@register_head("fewstep")
class FewStepHead(ContinuousHead):
    def __init__(self, token_dim: int, cond_dim: int, teacher: dict, steps: int = 1, teacher_steps: int = 50,
                 guidance_scales: list[float] | tuple[float, ...] = (1.0, 3.0), num_inference_steps: int | None = None,
                 embedded_guidance: bool = False):
        """``teacher``: the distilled head's spec (its network's size, schedule and sampler); ``steps``: the
        grid the student was distilled on (it samples in 1..``steps`` evaluations, ``num_inference_steps``
        by default); ``teacher_steps``: the teacher's steps; ``guidance_scales``: the CFG scales distilled;
        ``embedded_guidance``: draw guided tokens from the conditional branch alone (no CFG copy)."""
        if not 1 <= steps <= teacher_steps:
            raise ValueError(f"need 1 <= steps <= teacher_steps, got steps={steps}, teacher_steps={teacher_steps}")
        schedule = TeacherSchedule(dict(teacher), teacher_steps)
        super().__init__(token_dim, cond_dim, schedule.width, schedule.depth)
        self.steps, self.teacher_steps, self.schedule = steps, teacher_steps, schedule
        self.teacher, self.guidance_scales = dict(teacher), [float(w) for w in guidance_scales]
        self.embedded_guidance = bool(embedded_guidance)
        self.num_inference_steps = num_inference_steps or steps
        self.check_steps(self.num_inference_steps)
        self.grid = [k * teacher_steps // steps for k in range(steps + 1)]  # student grid, as teacher states
        self.target_embed = _embedding(self.schedule.width)
        self.guide_embed = _embedding(self.schedule.width)
        self.init_own_weights()

    @property
    def needs_guidance_branch(self) -> bool:
        """No unconditional copy for a student with the guidance distilled in."""
        return not self.embedded_guidance

    def init_own_weights(self) -> None:
        """Zero the target and guidance embeddings' last layers (the student starts as its teacher's network).
        Called here and again by ``MMARModel`` after transformers' default init, which would redraw every
        Linear; ``transformers.initialization`` leaves weights loaded from a checkpoint alone."""
        for emb in (self.target_embed, self.guide_embed):
            hf_init.zeros_(emb[-1].weight)
            hf_init.zeros_(emb[-1].bias)

    @classmethod
    def from_teacher(cls, teacher: Head, spec: dict, **options) -> FewStepHead:
        """A student initialised from ``teacher`` (its network's weights), ``spec`` being its config."""
        student = cls(token_dim=teacher.token_dim, cond_dim=teacher.net.cond_embed.in_features, teacher=spec, **options)
        student.net.load_state_dict(teacher.net.state_dict())
        return student.to(next(teacher.parameters()).device)

    def spec(self) -> dict:
        """This head's config entry (what ``build_head`` rebuilds it from)."""
        return {"name": self.name, "teacher": self.teacher, "steps": self.steps, "teacher_steps": self.teacher_steps,
                "guidance_scales": self.guidance_scales, "num_inference_steps": self.num_inference_steps,
                "embedded_guidance": self.embedded_guidance}

    def check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.steps:
            raise ValueError(f"this few-step head was distilled for 1 to {self.steps} sampling step(s), got "
                             f"num_inference_steps={steps}")

    def path(self, steps: int) -> list[int]:
        """The student-grid indices a ``steps``-step sample visits (evenly spread over the grid)."""
        self.check_steps(steps)
        return [round(k * self.steps / steps) for k in range(steps + 1)]

    def loss(self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise ValueError("a fewstep head is distilled from a trained diffusion or flow head (mmar distill-head), "
                         "not trained with the model: train the model with its teacher head, then distil")

    # -- the flow map ----------------------------------------------------------------------------
    def jump(self, x: torch.Tensor, i: int, j: int, cond: torch.Tensor, uncond: torch.Tensor | None = None,
             guidance_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """The state at student-grid time ``j`` predicted from ``x`` at grid time ``i`` (one evaluation,
        both CFG branches in one call). ``guidance_scale``: a number, or one per row ``[n]``. With
        ``embedded_guidance`` ``uncond`` is ignored: the conditional branch alone, ``guidance_scale`` an input."""
        ti, tj = self.grid[i], self.grid[j]
        if self.embedded_guidance:
            uncond = None
        cfg = uncond is not None or self.embedded_guidance
        w = torch.as_tensor(guidance_scale if cfg else 1.0, dtype=x.dtype, device=x.device).reshape(-1)
        w = w.expand(x.shape[0]) if w.numel() == 1 else w
        times = torch.tensor([self.schedule.times[ti], self.schedule.times[tj]], device=x.device)
        feats = timestep_features(times).to(x.dtype)
        rows, branches = guidance_rows(cond, uncond)
        y = self.net.cond_embed(rows) + self.net.time_embed(feats[0]) + self.target_embed(feats[1])
        y = y + self.guide_embed(timestep_features(w * GUIDE_SCALE).to(x.dtype)).repeat(branches, 1)
        out = self.net.denoise(x.repeat(branches, 1), self.net.modulations(y))
        a, b = self.schedule.coef(ti, tj)
        return a * x + b * guide(out, branches, w[:, None])

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
               temperature: float = 1.0, num_inference_steps: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Draw one token per row of ``cond`` in ``num_inference_steps`` (default: the head's) network
        evaluations, from noise scaled by ``temperature`` (the teacher's convention)."""
        path = self.path(num_inference_steps or self.num_inference_steps)
        x = self.initial_noise(cond, generator, temperature)
        for i, j in zip(path[:-1], path[1:]):
            x = self.jump(x, i, j, cond, uncond, guidance_scale)
        return x

    # -- the teacher's trajectory ------------------------------------------------------------------
    @torch.no_grad()
    def teacher_states(self, teacher: Head, noise: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The teacher's deterministic ``teacher_steps``-step sample from ``noise``, its states at the
        student grid's times: ``[steps + 1, n, token_dim]`` (the last is what ``teacher.sample`` draws
        from the same noise)."""
        sch, net = self.schedule, teacher.net
        rows, branches = guidance_rows(cond, uncond)
        c = net.cond_embed(rows)
        t_emb = net.time_embed(timestep_features(torch.tensor(sch.times[:-1], device=cond.device)).to(c.dtype))
        x, states = noise, [noise]
        for i in range(self.teacher_steps):
            out = net.denoise(x.repeat(branches, 1), net.modulations(t_emb[i] + c))
            a, b = sch.coef(i, i + 1)
            x = a * x + b * guide(out, branches, guidance_scale)
            if i + 1 in self.grid:
                states.append(x)
        return torch.stack(states)
