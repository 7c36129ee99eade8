"""Denoising trajectories as chains of Gaussians, and the speculative acceptance rules built on them.

A stochastic DDIM step (``eta > 0``; ``eta = 1`` is DDPM's ancestral step) is Gaussian:
``x' = a * x + b * f(x, t) + temperature * sigma * z`` with ``(a, b, sigma)`` depending only on the
timestep and ``f`` the denoiser's output (noise or velocity). The density of a whole trajectory is then a
product of Gaussians, and so is the ratio of two models' densities on the same trajectory: what
continuous speculative decoding (CSpD, Wang et al. 2024) needs to accept a draft token with
``min(1, p / q)`` and, on rejection, to draw from the residual ``max(0, p - q)`` by acceptance-rejection
(propose from the target, accept with ``1 - q / p``: the bound ``(p - q)+ <= p`` needs no integral).

The chain stops at the last stochastic step (timestep 0, the least noise of the schedule): the
deterministic final denoise of DDIM / DDPM has no density to compare, and a token the target would
finish differently than the draft could not be fed back unchanged. Plain sampling of this chain
(:func:`sample_trajectory` with the target alone) is the reference distribution speculative decoding
reproduces exactly. :func:`speculative_discrete` is the standard rule for text tokens (Leviathan et al.
2023, Chen et al. 2023).

A *denoiser* here is a callable ``f(x [n, d], step [n], rows [n]) -> [n, d]``: the network output at
chain step ``step`` for condition ``rows`` (see :class:`mmar.generation.speculative.HeadDenoiser`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class GaussianChain:
    """Step ``i`` maps ``x`` to ``N(a[i] x + b[i] f(x, timesteps[i]), (temperature * sigma[i])^2)``."""

    timesteps: torch.Tensor  # [S] the denoiser's timestep at each step
    a: torch.Tensor  # [S]
    b: torch.Tensor  # [S]
    sigma: torch.Tensor  # [S] > 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device, dtype=torch.float32) -> GaussianChain:
        return GaussianChain(self.timesteps.to(device), *(v.to(device, dtype) for v in (self.a, self.b, self.sigma)))


def gaussian_chain(sched: DDIMScheduler, eta: float = 1.0) -> GaussianChain:
    """The Gaussian steps of a diffusers ``DDIMScheduler`` (``set_timesteps`` already called), read off its
    own ``step`` with three probes per timestep (it is linear in the sample, the model output and the
    noise). Trailing deterministic steps (the final denoise) are dropped; ``eta = 0`` is an error."""
    if not isinstance(sched, DDIMScheduler) or sched.config.clip_sample or sched.config.thresholding:
        raise ValueError("speculative decoding needs a DDIMScheduler without clipping or thresholding")
    if not eta > 0:
        raise ValueError(f"speculative decoding needs stochastic steps (eta > 0), got eta={eta}")
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    coef = [[float(sched.step(m, t, x, eta=eta, variance_noise=z).prev_sample)
             for m, x, z in ((zero, one, zero), (one, zero, zero), (zero, zero, one))] for t in sched.timesteps]
    a, b, sigma = torch.tensor(coef, dtype=torch.float64).T
    keep = int(torch.nonzero(sigma > 0).max()) + 1 if (sigma > 0).any() else 0
    if keep == 0 or not (sigma[:keep] > 0).all():
        raise ValueError("speculative decoding needs every step but the final denoise to be stochastic")
    return GaussianChain(sched.timesteps[:keep].clone(), a[:keep], b[:keep], sigma[:keep])


def draw_noise(steps: int, n: int, dim: int, generator, device, dtype=torch.float32) -> torch.Tensor:
    """``[steps + 1, n, dim]`` standard normal draws: the initial noise and one per step."""
    return randn_tensor((steps + 1, n, dim), generator=generator, device=device, dtype=dtype)


def sample_trajectory(denoise, chain: GaussianChain, rows: torch.Tensor, noise: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chain for conditions ``rows`` ``[n]`` from ``noise`` (:func:`draw_noise`). Returns the
    states ``[S + 1, n, d]`` (``states[-1]`` is the token) and the step means ``[S, n, d]``."""
    x = temperature * noise[0]
    states, means = [x], []
    for i in range(len(chain)):
        step = torch.full_like(rows, i)
        m = chain.a[i] * x + chain.b[i] * denoise(x, step, rows)
        x = m + (temperature * chain.sigma[i]) * noise[i + 1]
        states.append(x)
        means.append(m)
    return torch.stack(states), torch.stack(means)


def trajectory_means(denoise, chain: GaussianChain, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Another denoiser's step means ``[S, n, d]`` on given ``states``, in one batched call."""
    S, n = len(chain), states.shape[1]
    x = states[:-1].flatten(0, 1)
    step = torch.arange(S, device=states.device).repeat_interleave(n)
    out = denoise(x, step, rows.repeat(S)).unflatten(0, (S, n))
    return chain.a[:, None, None] * states[:-1] + chain.b[:, None, None] * out


def log_ratio(states: torch.Tensor, means_p: torch.Tensor, means_q: torch.Tensor, chain: GaussianChain,
              temperature: float = 1.0) -> torch.Tensor:
    """``log p(trajectory) - log q(trajectory)`` ``[n]``: the shared initial noise and the equal variances
    cancel, leaving the squared distances of each step to the two means."""
    var = (temperature * chain.sigma.to(states.dtype)) ** 2
    x = states[1:]
    per_step = ((x - means_q).pow(2) - (x - means_p).pow(2)).sum(-1) / (2 * var[:, None])
    return per_step.sum(0)


def uniform(n: int, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) if generator is not None else \
        torch.rand(n, device=device)


def accept_drafts(target, chain: GaussianChain, states: torch.Tensor, means_q: torch.Tensor, rows: torch.Tensor,
                  generator, temperature: float = 1.0) -> torch.Tensor:
    """``[n]`` True where the draft's trajectories ``states`` (its step means ``means_q``) are accepted for
    the target's conditions ``rows``: with probability ``min(1, p / q)`` along the whole trajectory."""
    lr = log_ratio(states, trajectory_means(target, chain, states, rows), means_q, chain, temperature)
    return torch.log(uniform(len(lr), generator, states.device)) < lr


@dataclass
class Residual:
    """Tokens drawn from the residual, the states they came from, and how many rows hit ``max_tries``."""

    tokens: torch.Tensor  # [n, d]
    tries: torch.Tensor  # [n] proposals drawn until acceptance
    fallbacks: int  # rows that kept their last proposal after max_tries (then a plain target sample)


def residual_sample(target, draft, chain: GaussianChain, rows: torch.Tensor, dim: int, generator,
                    temperature: float = 1.0, max_tries: int = 100, chunk: int = 8) -> Residual:
    """Draws from ``norm(max(0, p - q))`` over trajectories for conditions ``rows``: target trajectories
    proposed ``chunk`` at a time per row, each accepted with ``max(0, 1 - q / p)``; the first accepted
    proposal of a row is its token. The same law as proposing one at a time (CSpD's scheme, batched)."""
    n, device = rows.shape[0], rows.device
    tokens = torch.zeros(n, dim, device=device, dtype=chain.a.dtype)
    tries = torch.zeros(n, dtype=torch.long, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(0, max_tries, chunk):
        idx = torch.nonzero(todo).flatten()
        r = rows[idx].repeat(chunk)  # proposal c of row idx[j] is at c * len(idx) + j
        states, means_p = sample_trajectory(target, chain, r, draw_noise(len(chain), len(r), dim, generator,
                                                                          device), temperature)
        lr = log_ratio(states, means_p, trajectory_means(draft, chain, states, r), chain, temperature)
        ok = (uniform(len(r), generator, device) < -torch.expm1(-lr)).view(chunk, len(idx))
        first = torch.where(ok.any(0), ok.float().argmax(0), chunk - 1)  # no success: the last proposal
        tokens[idx] = states[-1].view(chunk, len(idx), dim)[first, torch.arange(len(idx), device=device)]
        tries[idx] += torch.where(ok.any(0), first + 1, chunk)
        todo[idx] = ~ok.any(0)
        if not todo.any():
            break
    return Residual(tokens, tries, int(todo.sum()))


def speculative_discrete(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator=None):
    """Standard speculative sampling of one row: ``p`` ``[k + 1, V]`` target probabilities, ``q``
    ``[k, V]`` the draft's, ``drafted`` ``[k]`` its tokens. Returns ``(accepted, token)``: the first
    ``accepted`` drafted tokens are kept and ``token`` follows them (from ``norm(max(0, p - q))`` at the
    first rejection, else from ``p[k]``)."""
    k = drafted.shape[0]
    ar = torch.arange(k, device=p.device)
    ratio = p[ar, drafted] / q[ar, drafted].clamp(min=1e-30)
    rejected = torch.nonzero(uniform(k, generator, p.device) >= ratio).flatten()
    if len(rejected) == 0:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    j = int(rejected[0])
    residual = (p[j] - q[j]).clamp(min=0)
    residual = residual if residual.sum() > 0 else p[j]
    return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
