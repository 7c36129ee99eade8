"""The few-step head and ``mmar distill-head``: the teacher's trajectory is the teacher's sampler, the
head saves and reloads, a distilled student's 1-step samples match the teacher's many-step ones on a toy
whose conditional distribution is known, and the CLI distils a saved model that then generates."""

import json

import pytest
import torch

from mmar.heads import DiffusionHead, FewStepHead, available_heads, build_head
from mmar.training.distill import DistillArguments, pool_loss, segments, teacher_pool, train_student
from tests.conftest import make_tiny

SPECS = [{"name": "diffusion", "width": 32, "depth": 2},
         {"name": "diffusion", "width": 32, "depth": 2, "prediction_type": "epsilon"},
         {"name": "flow", "width": 32, "depth": 2, "shift": 3.0}]


def random_head(spec: dict, cond_dim: int = 5, token_dim: int = 3):
    torch.manual_seed(0)
    head = build_head(spec, cond_dim=cond_dim, token_dim=token_dim).eval()
    for p in head.parameters():  # away from the zero init, so the network's output matters
        torch.nn.init.normal_(p, std=0.2)
    return head


@pytest.mark.parametrize("spec", SPECS, ids=["v_prediction", "epsilon", "flow"])
def test_teacher_states_are_the_teachers_sampler(spec):
    """The trajectory the student regresses ends where the teacher's own sampler ends, from the same noise,
    with and without CFG; its first state is the noise."""
    teacher = random_head(spec)
    student = FewStepHead.from_teacher(teacher, spec, steps=2, teacher_steps=10, guidance_scales=[1.0, 3.0])
    c, u = torch.randn(7, 5), torch.randn(7, 5)
    for uncond, w in ((None, 1.0), (u, 3.0)):
        ref = teacher.sample(c, uncond=uncond, guidance_scale=w, num_inference_steps=10,
                             generator=torch.Generator().manual_seed(1))
        noise = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
        states = student.teacher_states(teacher, noise, c, uncond, w)
        assert states.shape == (3, 7, 3)
        assert torch.equal(states[0], noise)
        torch.testing.assert_close(states[-1], ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(states[1], states[-1], atol=1e-2)  # a real midpoint, not the end


def test_ddim_jumps_are_diffusers_steps():
    """The closed-form DDIM update between consecutive states equals diffusers' own step (as the teacher
    reads it off ``DDIMScheduler.step``)."""
    teacher = random_head(SPECS[0])
    student = FewStepHead.from_teacher(teacher, SPECS[0], steps=1, teacher_steps=10)
    sched = teacher.sampler()
    sched.set_timesteps(10)
    for i, (a, b) in enumerate(teacher.linear_steps(sched, "DDIMScheduler")):
        assert student.schedule.coef(i, i + 1) == pytest.approx((a, b), abs=1e-6)


def test_untrained_student_is_the_teacher_on_the_coarse_grid():
    """Initialised from the teacher with zeroed new embeddings: one jump is the teacher's one update."""
    teacher = random_head(SPECS[2])
    student = FewStepHead.from_teacher(teacher, SPECS[2], steps=1, teacher_steps=1)
    c = torch.randn(6, 5)
    torch.testing.assert_close(student.sample(c, generator=torch.Generator().manual_seed(0)),
                               teacher.sample(c, num_inference_steps=1, generator=torch.Generator().manual_seed(0)))


def test_registry_spec_and_errors():
    assert "fewstep" in available_heads()
    teacher = random_head(SPECS[0])
    student = FewStepHead.from_teacher(teacher, SPECS[0], steps=2, teacher_steps=10)
    rebuilt = build_head(student.spec(), cond_dim=5, token_dim=3)
    assert isinstance(rebuilt, FewStepHead) and rebuilt.grid == student.grid == [0, 5, 10]
    assert student.path(1) == [0, 2] and student.path(2) == [0, 1, 2]
    assert segments(2) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="distilled for 1 to 2"):
        student.sample(torch.randn(2, 5), num_inference_steps=3)
    with pytest.raises(ValueError, match="mmar distill-head"):
        student.loss(torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ValueError, match="deterministic sampler"):
        FewStepHead(token_dim=3, cond_dim=5, teacher={"name": "diffusion", "scheduler": "DDPMScheduler"})
    with pytest.raises(ValueError, match="distils a diffusion or flow head"):
        FewStepHead(token_dim=3, cond_dim=5, teacher={"name": "codebook"})
    with pytest.raises(ValueError, match="steps"):
        DistillArguments(model="a", output="b", steps=3, teacher_steps=2)


def test_saves_and_reloads_with_the_model(tmp_path):
    """A model whose head is a few-step head saves (safetensors + config.json) and reloads with the same
    outputs, through MMARPipeline.from_pretrained."""
    from mmar.pipeline import MMARPipeline
    from mmar.training.distill import save_student

    model, proc = make_tiny()
    teacher, spec = model.heads["image"], dict(model.config.modalities["image"].head)
    student = FewStepHead.from_teacher(teacher, spec, steps=2, teacher_steps=5, guidance_scales=[1.0, 2.0])
    for p in student.parameters():  # every weight matters, the zero-initialised ones too
        torch.nn.init.normal_(p, std=0.2)
    pipe = MMARPipeline(model, proc)
    save_student(pipe, "image", student, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["modalities"]["image"]["head"]["name"] == "fewstep"
    assert any(f.suffix == ".safetensors" for f in tmp_path.iterdir())
    loaded = MMARPipeline.from_pretrained(tmp_path).model.heads["image"]
    assert isinstance(loaded, FewStepHead)
    c, u = torch.randn(4, 32), torch.randn(4, 32)
    for steps in (1, 2):
        a = student.sample(c, uncond=u, guidance_scale=2.0, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(3))
        b = loaded.sample(c, uncond=u, guidance_scale=2.0, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_cli_distils_a_saved_model_that_generates(tmp_path, tiny_dir):
    """``mmar distill-head`` end to end on a tiny saved model: the output loads through MMARPipeline,
    draws images with CFG in one step, and writes its log, loss curve and summary; user errors exit 2."""
    from mmar.cli import main
    from mmar.pipeline import MMARPipeline

    out = tmp_path / "fast"
    assert main(["distill-head", "--model", str(tiny_dir), "--output", str(out), "--teacher_steps", "5",
                 "--guidance_scales", "1", "2", "--pairs", "256", "--max_steps", "6", "--max_samples", "64",
                 "--batch_size", "64",
                 "--progress", "false"]) == 0
    assert {"config.json", "log.jsonl", "loss_curve.png", "distill.json"} <= {f.name for f in out.iterdir()}
    summary = json.loads((out / "distill.json").read_text())
    assert summary["student"]["guidance_scales"] == [1.0, 2.0] and summary["token_pairs"] > 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all("val_loss" in r for r in rows)
    pipe = MMARPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.model.heads["image"], FewStepHead)
    images = pipe(["draw the digit seven"] * 2, mode="image", guidance_scale=2.0, max_items=1,
                  generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert [len(row) for row in images] == [1, 1] and images[0][0].size == (8, 8)
    assert main(["distill-head", "--model", str(tmp_path / "missing"), "--output", str(out)]) == 2
    with pytest.raises(SystemExit) as bad:
        main(["distill-head", "--model", str(tiny_dir), "--output", str(out), "--steps", "0"])
    assert bad.value.code == 2
    assert main(["distill-head", "--model", str(tiny_dir), "--output", str(tiny_dir)]) == 2


A = torch.tensor([[1.5, -0.5], [0.5, 1.0]])
SIGMA = 0.3


def gaussian_teacher() -> DiffusionHead:
    """A tiny diffusion head trained on a known conditional distribution: token | c ~ N(c A, 0.3^2 I)."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=2, width=32, depth=2, diffusion_batch_mul=4)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(300):
        c = torch.rand(128, 2) * 2 - 1
        loss = head.loss(c, c @ A + SIGMA * torch.randn(128, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def stats_error(draw, ref: dict) -> float:
    """Mean over test conditions of |mean - teacher's mean| + |std - teacher's std| (per dimension)."""
    errs = []
    for c, (mu, sd) in ref.items():
        s = draw(torch.tensor(c).expand(2000, 2), torch.Generator().manual_seed(5))
        errs.append(((s.mean(0) - mu).abs() + (s.std(0) - sd).abs()).mean().item())
    return sum(errs) / len(errs)


def test_one_step_student_matches_the_many_step_teacher(tmp_path):
    """On a toy whose conditional distribution is known, the distilled student's 1-step samples have the
    teacher's 20-step mean and spread per condition, far closer than the untrained student (one coarse
    teacher jump: the posterior mean, no spread) or the teacher's own 1-step DDIM (mostly noise)."""
    spec = {"name": "diffusion", "width": 32, "depth": 2, "diffusion_batch_mul": 4}
    teacher = gaussian_teacher()
    options = dict(steps=1, teacher_steps=20, guidance_scales=[1.0])
    student, untrained = (FewStepHead.from_teacher(teacher, spec, **options) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand(4000, 2, generator=gen) * 2 - 1
    pool = teacher_pool(student, teacher, cond, cond, [1.0], 2048, gen)
    val = teacher_pool(student, teacher, cond[:500], cond[:500], [1.0], 512, gen)
    args = DistillArguments(model="m", output="o", max_steps=300, batch_size=256, learning_rate=1e-3,
                            logging_steps=100, progress=False)
    before = pool_loss(untrained, val)
    log = train_student(student, pool, val, args, str(tmp_path / "log.jsonl"))
    assert log[-1]["val_loss"] < 0.2 * before, (before, log)
    conds = [(-0.8, 0.6), (0.0, 0.0), (0.7, 0.9), (0.5, -0.7)]
    ref = {}
    for c in conds:
        s = teacher.sample(torch.tensor(c).expand(2000, 2), num_inference_steps=20,
                           generator=torch.Generator().manual_seed(9))
        ref[c] = (s.mean(0), s.std(0))
        assert (s.std(0) - SIGMA).abs().max() < 0.1  # the teacher learned the spread it was shown
    err = stats_error(lambda c, g: student.sample(c, generator=g), ref)
    err_untrained = stats_error(lambda c, g: untrained.sample(c, generator=g), ref)
    err_teacher1 = stats_error(lambda c, g: teacher.sample(c, num_inference_steps=1, generator=g), ref)
    assert err < 0.1, err
    assert err < 0.4 * min(err_untrained, err_teacher1), (err, err_untrained, err_teacher1)


def test_a_fresh_model_with_a_fewstep_head_keeps_the_zeroed_embeddings():
    """A model built with a few-step head keeps the head's own init (target and guidance embeddings' last
    layers zero, so the student starts as its teacher's network): transformers' default init would redraw
    them, as it did before the head owned its init."""
    from mmar.modeling import MMARModel

    model, _ = make_tiny()
    config = model.config.to_dict()
    teacher = dict(config["modalities"]["image"]["head"])
    config["modalities"]["image"]["head"] = {"name": "fewstep", "teacher": teacher, "steps": 2, "teacher_steps": 5}
    fresh = MMARModel(type(model.config).from_dict(config))
    head = fresh.heads["image"]
    assert isinstance(head, FewStepHead)
    for emb in (head.target_embed, head.guide_embed):
        assert torch.count_nonzero(emb[-1].weight) == 0 and torch.count_nonzero(emb[-1].bias) == 0
        assert torch.count_nonzero(emb[0].weight) > 0  # the first layer is drawn, not zeroed


def guided_gaussian_teacher() -> DiffusionHead:
    """A toy diffusion head trained with condition dropout: token | c ~ N(c A, 0.3^2 I), and with the
    condition dropped (zeros, the "unconditional branch") the marginal over c."""
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=2, width=48, depth=2, diffusion_batch_mul=4)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(400):
        c = torch.rand(256, 2) * 2 - 1
        keep = (torch.rand(256, 1) > 0.3).float()
        loss = head.loss(c * keep, c @ A + SIGMA * torch.randn(256, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def test_embedded_guidance_student_draws_the_guided_distribution_from_the_condition_alone(tmp_path):
    """Guidance distillation: a student with ``embedded_guidance`` sees only the conditional branch, yet its
    1-step samples have, at w = 3, the CFG-guided teacher's mean and spread (teacher: both branches, 20
    steps) and, at w = 1, the unguided teacher's; and it ignores any unconditional rows it is handed."""
    spec = {"name": "diffusion", "width": 48, "depth": 2, "diffusion_batch_mul": 4}
    teacher, w = guided_gaussian_teacher(), 3.0
    student = FewStepHead.from_teacher(teacher, spec, steps=1, teacher_steps=20, guidance_scales=[1.0, w],
                                       embedded_guidance=True)
    assert student.needs_guidance_branch is False and student.spec()["embedded_guidance"] is True
    assert FewStepHead.from_teacher(teacher, spec, steps=1, teacher_steps=20).needs_guidance_branch is True
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand(4000, 2, generator=gen) * 2 - 1
    pool = teacher_pool(student, teacher, cond, torch.zeros_like(cond), [1.0, w], 4096, gen)
    val = teacher_pool(student, teacher, cond[:500], torch.zeros(500, 2), [1.0, w], 512, gen)
    args = DistillArguments(model="m", output="o", max_steps=800, batch_size=256, learning_rate=2e-3,
                            logging_steps=400, progress=False)
    train_student(student, pool, val, args, str(tmp_path / "log.jsonl"))
    guided, plain = {}, {}
    for c in [(-0.8, 0.6), (0.7, 0.9), (0.5, -0.7)]:
        x = torch.tensor(c).expand(2000, 2)
        g = teacher.sample(x, uncond=torch.zeros_like(x), guidance_scale=w, num_inference_steps=20,
                           generator=torch.Generator().manual_seed(9))
        p = teacher.sample(x, num_inference_steps=20, generator=torch.Generator().manual_seed(9))
        guided[c], plain[c] = (g.mean(0), g.std(0)), (p.mean(0), p.std(0))
    assert stats_error(lambda c, g: teacher.sample(c, num_inference_steps=20, generator=g), guided) > 0.25
    for scale, ref, other in ((w, guided, plain), (1.0, plain, guided)):
        err = stats_error(lambda c, g: student.sample(c, guidance_scale=scale, generator=g), ref)
        assert err < 0.12, (scale, err)
        assert err < 0.4 * stats_error(lambda c, g: student.sample(c, guidance_scale=scale, generator=g), other)
    c = torch.rand(64, 2)
    a = student.sample(c, guidance_scale=w, generator=torch.Generator().manual_seed(1))
    b = student.sample(c, uncond=torch.randn(64, 2), guidance_scale=w, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def _backbone_rows(pipe) -> list[int]:
    """Record the batch size of every backbone call of ``pipe``'s model."""
    seen = []
    pipe.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    return seen


def test_embedded_guidance_cli_model_samples_without_the_unconditional_copy(tmp_path, tiny_dir):
    """``mmar distill-head --embedded_guidance true``: the saved student reloads with the flag, and under
    CFG the sampler runs the backbone on the conditional rows alone (the plain few-step head: twice as many
    rows), handing the head the guidance scale; dual guidance (which needs the branches) is refused."""
    from mmar.cli import main
    from mmar.pipeline import MMARPipeline

    common = ["--model", str(tiny_dir), "--teacher_steps", "5", "--guidance_scales", "1", "2", "--pairs", "128",
              "--max_steps", "2", "--max_samples", "32", "--batch_size", "64", "--progress", "false"]
    for name, flag in (("embedded", "true"), ("plain", "false")):
        assert main(["distill-head", *common, "--output", str(tmp_path / name), "--embedded_guidance", flag]) == 0
    rows = {}
    for name in ("embedded", "plain"):
        pipe = MMARPipeline.from_pretrained(tmp_path / name)
        pipe.set_progress_bar_config(disable=True)
        head = pipe.model.heads["image"]
        assert head.embedded_guidance is (name == "embedded")
        scales, sample = [], head.sample
        head.sample = lambda cond, uncond=None, guidance_scale=1.0, **kw: (
            scales.append((uncond is None, guidance_scale)) or sample(cond, uncond=uncond,
                                                                     guidance_scale=guidance_scale, **kw))
        seen = _backbone_rows(pipe)
        out = pipe(["draw the digit seven"] * 3, mode="image", guidance_scale=2.0, max_items=1,
                   generator=[torch.Generator().manual_seed(i) for i in range(3)])
        assert [len(r) for r in out.images] == [1, 1, 1] and out.images[0][0].size == (8, 8)
        rows[name] = set(seen)
        assert set(scales) == {(name == "embedded", 2.0)}
    assert rows == {"embedded": {3}, "plain": {6}}
    pipe = MMARPipeline.from_pretrained(tmp_path / "embedded")
    with pytest.raises(ValueError, match="image_guidance_scale"):
        pipe(["draw the digit seven"], mode="image", guidance_scale=2.0, image_guidance_scale=1.5, max_items=1)
