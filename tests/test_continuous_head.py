"""The continuous heads' shared base (mmar/heads/continuous.py): diffusion, flow and few-step heads draw
exactly what their own sampling loops drew before the base existed (those loops are kept below, written
out with the network's public pieces), and a new continuous head needs only its loop."""

import inspect

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from mmar.heads import ContinuousHead, DiffusionHead, FewStepHead, FlowHead, build_head
from mmar.heads.continuous import timestep_features
from mmar.heads.flow import TIME_SCALE
from mmar.heads.guidance import guidance_rows, guide


def _mods(net, rows, times):
    c = net.cond_embed(rows)
    t_emb = net.time_embed(timestep_features(times).to(c.dtype))
    return net.per_step(net.modulations(t_emb[:, None, :] + c[None]))


@torch.no_grad()
def _old_diffusion(head, cond, uncond=None, guidance_scale=1.0, temperature=1.0, num_inference_steps=None,
                   generator=None, scheduler=None, image_guidance_scale=None):
    """DiffusionHead.sample before the base class."""
    sched = head.sampler(scheduler)
    sched.set_timesteps(num_inference_steps or head.num_inference_steps, device=cond.device)
    linear = head.linear_steps(sched, scheduler or head.scheduler_name)
    x = randn_tensor((cond.shape[0], head.token_dim), generator=generator, device=cond.device, dtype=cond.dtype)
    x = x * temperature * sched.init_noise_sigma
    rows, branches = guidance_rows(cond, uncond)
    mods = _mods(head.net, rows, sched.timesteps.to(cond.device))
    params = inspect.signature(sched.step).parameters
    for i, t in enumerate(sched.timesteps):
        xin = x.repeat(branches, 1) if branches > 1 else x
        xin = xin if linear else sched.scale_model_input(xin, t)
        out = guide(head.net.denoise(xin, mods[i]), branches, guidance_scale, image_guidance_scale)
        if linear:
            a, b = linear[i]
            x = torch.add(x * a, out, alpha=b)
            continue
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = head.eta
            if head.eta > 0:
                kwargs["variance_noise"] = temperature * randn_tensor(x.shape, generator=generator, dtype=x.dtype)
        elif "generator" in params:
            kwargs["generator"] = generator
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


@torch.no_grad()
def _old_flow(head, cond, uncond=None, guidance_scale=1.0, temperature=1.0, num_inference_steps=None,
              generator=None, image_guidance_scale=None):
    """FlowHead.sample before the base class."""
    ts = torch.linspace(1.0, 0.0, (num_inference_steps or head.num_inference_steps) + 1)
    ts = head.shift * ts / (1 + (head.shift - 1) * ts)
    x = temperature * randn_tensor((cond.shape[0], head.token_dim), generator=generator, dtype=cond.dtype)
    rows, branches = guidance_rows(cond, uncond)
    mods = _mods(head.net, rows, ts[:-1] * TIME_SCALE)
    for i, dt in enumerate((ts[1:] - ts[:-1]).tolist()):
        v = head.net.denoise(x.repeat(branches, 1) if branches > 1 else x, mods[i])
        x = torch.add(x, guide(v, branches, guidance_scale, image_guidance_scale), alpha=dt)
    return x


@torch.no_grad()
def _old_fewstep(head, cond, uncond=None, guidance_scale=1.0, temperature=1.0, num_inference_steps=None,
                 generator=None):
    """FewStepHead.sample (its jumps) before the base class."""
    path = head.path(num_inference_steps or head.num_inference_steps)
    x = temperature * randn_tensor((cond.shape[0], head.token_dim), generator=generator, dtype=cond.dtype)
    cfg = uncond is not None
    for i, j in zip(path[:-1], path[1:]):
        ti, tj = head.grid[i], head.grid[j]
        w = torch.as_tensor(guidance_scale if cfg else 1.0, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        feats = timestep_features(torch.tensor([head.schedule.times[ti], head.schedule.times[tj]])).to(x.dtype)
        y = head.net.cond_embed(torch.cat([cond, uncond]) if cfg else cond) + head.net.time_embed(feats[0]) \
            + head.target_embed(feats[1])
        g = head.guide_embed(timestep_features(w * 100.0).to(x.dtype))
        y = y + (torch.cat([g, g]) if cfg else g)
        out = head.net.denoise(torch.cat([x, x]) if cfg else x, head.net.modulations(y))
        if cfg:
            oc, ou = out.chunk(2)
            out = torch.lerp(ou, oc, w[:, None])
        a, b = head.schedule.coef(ti, tj)
        x = a * x + b * out
    return x


SPECS = {
    "ddim": ({"name": "diffusion"}, _old_diffusion),
    "ddim-epsilon": ({"name": "diffusion", "prediction_type": "epsilon"}, _old_diffusion),
    "ddim-eta": ({"name": "diffusion", "eta": 0.7}, _old_diffusion),
    "ddpm": ({"name": "diffusion", "scheduler": "DDPMScheduler"}, _old_diffusion),
    "euler": ({"name": "diffusion", "scheduler": "EulerDiscreteScheduler"}, _old_diffusion),
    "flow": ({"name": "flow"}, _old_flow),
    "flow-shift": ({"name": "flow", "shift": 3.0}, _old_flow),
    "fewstep": ({"name": "fewstep", "teacher": {"name": "diffusion", "width": 32, "depth": 2}, "steps": 2,
                 "teacher_steps": 10}, _old_fewstep),
    "fewstep-flow": ({"name": "fewstep", "teacher": {"name": "flow", "width": 32, "depth": 2}, "steps": 2,
                      "teacher_steps": 8}, _old_fewstep),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_same_samples_as_the_heads_own_loops_for_the_same_seeds(name):
    spec, old = SPECS[name]
    torch.manual_seed(0)
    small = {"width": 32, "depth": 2, **({"num_inference_steps": 6} if spec["name"] == "diffusion" else {})}
    head = build_head(spec if "teacher" in spec else {**small, **spec}, cond_dim=12, token_dim=5)
    for p in head.parameters():  # random everywhere (a fresh head's zeroed output would hide differences)
        torch.nn.init.normal_(p, std=0.3)
    cond, u1, u2 = torch.randn(4, 12), torch.randn(4, 12), torch.randn(4, 12)
    cases = [{}, {"uncond": u1, "guidance_scale": 3.0}, {"temperature": 0.6, "num_inference_steps": 1}]
    if not name.startswith("fewstep"):
        cases += [{"uncond": (u1, u2), "guidance_scale": 2.5, "image_guidance_scale": 1.5},
                  {"num_inference_steps": 3}]
    for kw in cases:
        for gen in (lambda: torch.Generator().manual_seed(7),
                    lambda: [torch.Generator().manual_seed(i) for i in range(4)]):
            new, ref = head.sample(cond, generator=gen(), **kw), old(head, cond, generator=gen(), **kw)
            assert new.shape == (4, 5) and torch.equal(new, ref), (name, kw)
        torch.manual_seed(3)  # the global generator too
        new = head.sample(cond, **kw)
        torch.manual_seed(3)
        assert torch.equal(new, old(head, cond, **kw)), (name, kw)


def test_the_heads_share_one_base_and_a_new_head_is_its_loop():
    for cls in (DiffusionHead, FlowHead, FewStepHead):
        assert issubclass(cls, ContinuousHead)
    assert DiffusionHead.sample is FlowHead.sample is ContinuousHead.sample  # one signature
    assert "image_guidance_scale" in inspect.signature(ContinuousHead.sample).parameters

    class Jump(ContinuousHead):
        """Noise straight to the network's guided output at time 0, in one step."""

        num_inference_steps = 1

        def integrate(self, cond, uncond, guidance, temperature, steps, generator):
            x = self.initial_noise(cond, generator, temperature)
            mods, branches = self.step_modulations(cond, uncond, torch.zeros(steps))
            return self.guided_output(x, mods[0], branches, guidance)

    torch.manual_seed(0)
    head = Jump(token_dim=3, cond_dim=6, width=16, depth=1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cond, uncond = torch.randn(2, 6), torch.randn(2, 6)
    x = head.sample(cond, uncond=uncond, guidance_scale=2.0, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    noise = torch.cat([torch.randn(1, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        c, u = head.net(noise, t, cond), head.net(noise, t, uncond)
    torch.testing.assert_close(x, u + 2.0 * (c - u))
    with pytest.raises(TypeError):
        head.sample(cond, scheduler="DDIMScheduler")  # options a head's loop does not take are refused
