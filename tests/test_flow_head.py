"""The flow-matching head (rectified flow, Euler sampling): registry, learning, sampling, CFG, and its
life inside an MMAR model (save / load, pipeline generation)."""

import pytest
import torch

from tests.conftest import TINY_MODALITIES, make_tiny
from mmar.heads import FlowHead, SimpleMLPAdaLN, available_heads, build_head
from mmar.heads.flow import TIME_SCALE

MEANS = torch.tensor([[-2.0, -2.0], [2.0, 2.0], [2.0, -2.0]])
STD = 0.3
FLOW_MODALITIES = {"image": {"tokenizer": TINY_MODALITIES["image"]["tokenizer"],
                             "head": {"name": "flow", "width": 32, "depth": 2, "num_inference_steps": 4}}}


def random_head(**kw) -> FlowHead:
    torch.manual_seed(0)
    head = FlowHead(**{"token_dim": 3, "cond_dim": 5, "width": 32, "depth": 2, **kw}).eval()
    for p in head.parameters():  # away from the zero init, so the network's output matters
        torch.nn.init.normal_(p, std=0.2)
    return head


def test_registered_and_built_by_name():
    assert "flow" in available_heads()
    head = build_head({"name": "flow", "width": 16, "depth": 1, "num_inference_steps": 6}, cond_dim=4, token_dim=2)
    assert isinstance(head, FlowHead) and isinstance(head.net, SimpleMLPAdaLN)  # the diffusion head's network
    assert head.num_inference_steps == 6 and head.token_dim == 2
    with pytest.raises(ValueError, match="time_sampling"):
        FlowHead(token_dim=2, cond_dim=4, time_sampling="beta")
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowHead(token_dim=2, cond_dim=4, num_inference_steps=0)


def test_learns_a_2d_gaussian_mixture():
    """Trained alone, the loss falls and 8 Euler steps sample the mixture's modes with the right weights."""
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=4, width=64, depth=2, diffusion_batch_mul=2, time_sampling="uniform")
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        x = MEANS[torch.randint(0, 3, (256,))] + STD * torch.randn(256, 2)
        loss = head.loss(torch.zeros(256, 4), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the velocity's irreducible variance keeps the loss well above 0; the start (zero output) is E|noise - x0|^2
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:5]) / 5
    s = head.sample(torch.zeros(3000, 4), num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    nearest = torch.cdist(s, MEANS).argmin(1)
    assert (torch.cdist(s, MEANS).min(1).values < 1.0).float().mean() > 0.85  # on the modes, not between them
    for i in range(3):
        part = s[nearest == i]
        assert abs(len(part) / len(s) - 1 / 3) < 0.1
        assert torch.allclose(part.mean(0), MEANS[i], atol=0.35), part.mean(0)


def test_sampling_shape_determinism_and_per_row_generators():
    head = random_head(num_inference_steps=5)
    cond = torch.randn(4, 5)
    a = head.sample(cond, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 3) and torch.isfinite(a).all()
    assert torch.equal(a, head.sample(cond, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, head.sample(cond, generator=torch.Generator().manual_seed(2)))
    both = head.sample(cond[:2], generator=[torch.Generator().manual_seed(i) for i in (5, 6)])
    alone = head.sample(cond[1:2], generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(both[1:], alone)
    # more steps is a different (finer) integration of the same ODE from the same noise
    assert not torch.allclose(a, head.sample(cond, num_inference_steps=20, generator=torch.Generator().manual_seed(1)))


def test_one_euler_step_and_cfg_convention():
    """With one step the sample is ``noise - v(noise, t=1)``; CFG mixes velocities as ``u + s (c - u)``."""
    head = random_head()
    cond, uncond = torch.randn(6, 5), torch.randn(6, 5)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    t = torch.full((6,), TIME_SCALE)
    vc, vu = head.net(noise, t, cond), head.net(noise, t, uncond)
    for s in (1.0, 3.0):
        got = head.sample(cond, uncond, guidance_scale=s, num_inference_steps=1,
                          generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(got, noise - (vu + s * (vc - vu)), rtol=1e-5, atol=1e-5)
    plain = head.sample(cond, num_inference_steps=3, generator=torch.Generator().manual_seed(4))
    same = head.sample(cond, uncond, guidance_scale=1.0, num_inference_steps=3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(plain, same, rtol=1e-5, atol=1e-5)
    guided = head.sample(cond, uncond, guidance_scale=4.0, num_inference_steps=3, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(plain, guided, atol=1e-3)


def test_temperature_and_time_grid():
    head = random_head(shift=3.0)
    grid = head.time_grid(4)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid[1:] < grid[:-1]).all()
    assert grid[2] > 0.5  # shift > 1 spends more of the steps at the noisy end
    uniform = random_head().time_grid(4)
    torch.testing.assert_close(uniform, torch.linspace(1, 0, 5))
    # temperature scales the starting noise only, then the learned velocity moves it: the sample equals a
    # hand-written Euler loop over the network's plain forward, started from temperature * noise (a random
    # head, so the velocity is not zero and a final rescaling would not pass)
    head = random_head(num_inference_steps=6)
    cond = torch.randn(300, 5, generator=torch.Generator().manual_seed(2))
    ts = head.time_grid(6)
    draws = {}
    for temperature in (0.5, 1.0):
        x = temperature * torch.randn(300, head.token_dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t, t_next in zip(ts[:-1], ts[1:]):
                x = x + (t_next - t) * head.net(x, torch.full((300,), float(t) * TIME_SCALE), cond)
        draws[temperature] = head.sample(cond, temperature=temperature, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(draws[temperature], x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(draws[0.5], 0.5 * draws[1.0], atol=1e-2)
    assert draws[0.5].std() < draws[1.0].std()


def test_inside_an_mmar_model_save_load_and_pipeline(tmp_path):
    from mmar import MMARModel
    from mmar.pipeline import MMARPipeline
    from mmar.sequence import MMARProcessor

    model, proc = make_tiny(modalities=FLOW_MODALITIES)
    assert isinstance(model.heads["image"], FlowHead)
    # a training step: the flow loss reaches the backbone
    model.train()
    from mmar.datasets import DigitsDataset

    ds = DigitsDataset(pairs_per_image=0.1)
    out = model(**proc([ds[0], ds[2], ds[-1]]))
    assert torch.isfinite(out.loss) and out.modality_losses["image"] > 0
    out.loss.backward()
    assert model.backbone.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()

    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = MMARModel.from_pretrained(tmp_path).eval()
    assert loaded.config.modalities["image"].head["name"] == "flow"
    assert isinstance(loaded.heads["image"], FlowHead) and loaded.heads["image"].num_inference_steps == 4
    for k, v in model.heads.state_dict().items():
        assert torch.equal(v, loaded.heads.state_dict()[k]), k

    pipe = MMARPipeline(loaded, MMARProcessor.from_pretrained(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(mode="image", guidance_scale=2.0, max_items=1, max_new_tokens=4)
    a = pipe("draw a 3", generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = pipe("draw a 3", generator=torch.Generator().manual_seed(0), **kw).images[0]
    c = pipe("draw a 3", generator=torch.Generator().manual_seed(1), **kw).images[0]
    assert len(a) == 1 and a[0].size == (8, 8)
    assert a[0].tobytes() == b[0].tobytes() and a[0].tobytes() != c[0].tobytes()
    # the original model (same weights) draws the same image: the round trip kept the head
    orig = MMARPipeline(model, proc)
    orig.set_progress_bar_config(disable=True)
    assert orig("draw a 3", generator=torch.Generator().manual_seed(0), **kw).images[0][0].tobytes() == a[0].tobytes()
