import torch

from mmar.heads import DiffusionHead, available_heads

MEANS = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [2.0, -2.0]])
STD = 0.3


def test_registry():
    assert "diffusion" in available_heads()


def test_learns_a_2d_gaussian_mixture():
    """Trained alone, the head samples with the mixture's weights, means and variances."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=4, width=128, depth=3, diffusion_batch_mul=2, num_inference_steps=50)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(800):
        k = torch.randint(0, 3, (256,))
        x = MEANS[k] + STD * torch.randn(256, 2)
        loss = head.loss(torch.zeros(256, 4), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = head.sample(torch.zeros(3000, 4), generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(s, MEANS).argmin(1)
    for i in range(3):
        part = s[nearest == i]
        assert abs(len(part) / len(s) - 1 / 3) < 0.06
        assert torch.allclose(part.mean(0), MEANS[i], atol=0.2), part.mean(0)
        assert torch.allclose(part.std(0), torch.full((2,), STD), atol=0.12), part.std(0)


def test_conditioning_and_cfg():
    """A conditional head: CFG scale 1 equals no CFG; a larger scale moves samples away from uncond."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=3, width=64, depth=2, diffusion_batch_mul=1, num_inference_steps=20)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cond, uncond = torch.randn(8, 3), torch.randn(8, 3)

    def draw(**kw):
        return head.sample(cond, generator=torch.Generator().manual_seed(3), **kw)

    assert torch.allclose(draw(uncond=uncond, guidance_scale=1.0), draw(), atol=1e-6)
    assert not torch.allclose(draw(uncond=uncond, guidance_scale=4.0), draw(), atol=1e-3)
    # one denoising step makes the sample affine in the network's output, so the guided sample is the
    # guidance formula u + s (c - u) of the conditional and the unconditional samples drawn from the same noise
    for prediction_type in ("v_prediction", "epsilon"):
        torch.manual_seed(1)
        head = DiffusionHead(token_dim=2, cond_dim=3, width=64, depth=2, num_inference_steps=1,
                             prediction_type=prediction_type)
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.1)
        c, u = draw(), head.sample(uncond, generator=torch.Generator().manual_seed(3))  # draw() uses this head
        assert not torch.allclose(c, u, atol=1e-3)
        for scale in (0.0, 2.5, 4.0):
            torch.testing.assert_close(draw(uncond=uncond, guidance_scale=scale), u + scale * (c - u),
                                       rtol=1e-5, atol=1e-5)


def test_per_row_generators_make_rows_independent():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=3, width=32, depth=1, num_inference_steps=10)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cond = torch.randn(2, 3)
    both = head.sample(cond, generator=[torch.Generator().manual_seed(i) for i in (5, 6)])
    alone = head.sample(cond[1:], generator=[torch.Generator().manual_seed(6)])
    assert torch.allclose(both[1:], alone, atol=1e-6)


def test_temperature_and_samplers():
    head = DiffusionHead(token_dim=2, cond_dim=2, width=16, depth=1, num_inference_steps=10)
    cold = head.sample(torch.zeros(500, 2), temperature=0.1, generator=torch.Generator().manual_seed(0))
    warm = head.sample(torch.zeros(500, 2), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert cold.std() < warm.std()
    ddpm = head.sample(torch.zeros(4, 2), scheduler="DDPMScheduler", generator=torch.Generator().manual_seed(0))
    assert ddpm.shape == (4, 2) and torch.isfinite(ddpm).all()


def test_ddim_fast_path_equals_diffusers_step(monkeypatch):
    """Deterministic DDIM skips the scheduler's per-step Python (x_prev = a x + b out, coefficients read
    off diffusers' own step); the samples equal those of the plain diffusers loop, with and without CFG,
    for v-prediction and epsilon."""
    for prediction_type in ("v_prediction", "epsilon"):
        torch.manual_seed(0)
        head = DiffusionHead(token_dim=3, cond_dim=8, width=32, depth=2, num_inference_steps=12,
                             prediction_type=prediction_type).eval()
        for p in head.parameters():  # away from the zero init, so the network's output matters
            torch.nn.init.normal_(p, std=0.2)
        cond, uncond = torch.randn(5, 8), torch.randn(5, 8)
        fast = [head.sample(cond, generator=torch.Generator().manual_seed(1)),
                head.sample(cond, uncond, guidance_scale=2.5, generator=torch.Generator().manual_seed(1))]
        assert head._linear_steps  # the fast path ran
        with monkeypatch.context() as m:
            m.setattr(head, "linear_steps", lambda *a: None)
            slow = [head.sample(cond, generator=torch.Generator().manual_seed(1)),
                    head.sample(cond, uncond, guidance_scale=2.5, generator=torch.Generator().manual_seed(1))]
        for f, s in zip(fast, slow):
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)
    head.eta = 0.5  # stochastic DDIM has no fixed coefficients: the plain loop runs
    sched = head.sampler()
    sched.set_timesteps(12)
    assert head.linear_steps(sched, "DDIMScheduler") is None
