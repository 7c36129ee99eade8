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


def test_a_fresh_head_outputs_exactly_zero_and_its_first_loss_is_the_targets_second_moment():
    """The output layer and every AdaLN modulation start at zero, so a fresh head's network outputs exactly
    0 for any input; its loss is then E|goal|^2, which on unit-normal targets is 1 for both prediction types
    (epsilon: E|noise|^2; v: alpha^2 + sigma^2 = 1) and 2 for the flow head (E|noise - x0|^2). One optimizer
    step moves the output off zero."""
    from mmar.heads import FlowHead

    torch.manual_seed(0)
    x, t, cond = torch.randn(64, 6), torch.randint(0, 1000, (64,)), torch.randn(64, 5)
    for head, expected in [(DiffusionHead(token_dim=6, cond_dim=5, width=32, depth=2), 1.0),
                           (DiffusionHead(token_dim=6, cond_dim=5, width=32, depth=2, prediction_type="epsilon"), 1.0),
                           (FlowHead(token_dim=6, cond_dim=5, width=32, depth=2), 2.0)]:
        assert torch.equal(head.net(x, t.float(), cond), torch.zeros(64, 6)), type(head).__name__
        torch.manual_seed(1)
        loss = head.loss(torch.randn(4096, 5), torch.randn(4096, 6))  # 4096 x 6 x batch_mul draws
        assert abs(loss.item() - expected) < 0.05, (type(head).__name__, loss.item())
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert head.net(x, t.float(), cond).abs().max() > 1e-4  # trainable: the zero init is not a dead end


def test_guidance_mixes_known_branch_outputs_by_the_formula(monkeypatch):
    """The network's output replaced by known per-branch values: single guidance returns u + s (c - u),
    exactly c at s = 1 and exactly u at s = 0; dual guidance returns
    none + s_img (image_only - none) + s (full - image_only), exactly full at s = s_img = 1."""
    from mmar.heads.guidance import guide

    c, u = torch.tensor([[1.0, 2.0], [-3.0, 0.5]]), torch.tensor([[0.5, -1.0], [1.0, 0.5]])
    assert torch.equal(guide(torch.cat([c, u]), 2, 3.0), torch.tensor([[2.0, 8.0], [-11.0, 0.5]]))  # by hand
    assert torch.equal(guide(torch.cat([c, u]), 2, 1.0), c) and torch.equal(guide(torch.cat([c, u]), 2, 0.0), u)
    full, image_only, none = c, u, torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    three = torch.cat([full, image_only, none])
    # none + 1.5 (image_only - none) + 4 (full - image_only), by hand
    assert torch.equal(guide(three, 3, 4.0, 1.5), torch.tensor([[2.75, 10.0], [-15.5, -0.25]]))
    assert torch.equal(guide(three, 3, 1.0, 1.0), full)
    assert torch.equal(guide(three, 3, 4.0), guide(three, 3, 4.0, 1.0))  # image scale unset: 1
    # inside the head: the network's output is the branch's own known value, the same x goes to each branch
    head = DiffusionHead(token_dim=2, cond_dim=3, width=16, depth=1)
    seen = []

    def known(xin, mods):
        seen.append(xin)
        return torch.cat([c, u, none][:xin.shape[0] // 2])

    monkeypatch.setattr(head.net, "denoise", known)
    x = torch.randn(2, 2)
    mods, branches = head.step_modulations(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(1))
    assert branches == 2
    torch.testing.assert_close(head.guided_output(x, mods, 2, (2.5, None)), u + 2.5 * (c - u))
    assert torch.equal(head.guided_output(x, mods, 2, (1.0, None)), c)
    assert torch.equal(seen[0], torch.cat([x, x]))
