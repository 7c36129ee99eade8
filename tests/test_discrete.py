"""Discrete image tokens: the image-vq tokenizer, the codebook head, and a model that uses both."""

import json

import numpy as np
import pytest
import torch

from mmar import Image, Message, MMARModel, MMARProcessor
from mmar.cli import main
from mmar.generation import generate
from mmar.heads import CodebookHead
from mmar.tokenizers import ImageVQTokenizer, ModalityTokenizer, build_tokenizer
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    cfg = out / "vq.yaml"
    cfg.write_text("tokenizer: {name: image-vq, codebook_size: 64, image_size: 8, patch_size: 2}\n"
                   f"output_dir: {out / 'tok'}\nsteps: 60\nbatch_size: 256\n")
    assert main(["train-tokenizer", "--config", str(cfg)]) == 0
    return out / "tok"


def test_vq_round_trip_error_is_measured_and_small(vq_dir):
    report = json.loads((vq_dir / "reconstruction.json").read_text())
    assert report["heldout"]["psnr_db"] > 20  # 64 codes over 2x2 patches of 8x8 digits
    tok = ModalityTokenizer.from_pretrained(vq_dir)
    assert isinstance(tok, ImageVQTokenizer) and tok.vocab_size == 64 and tok.kind == "discrete"
    from mmar.datasets.digits import load_digit_split

    x, _ = load_digit_split("test")
    pixels = torch.stack([tok.preprocess(im) for im in x[:50]])
    codes = tok.encode(pixels)
    assert codes.shape == (50, 16) and codes.dtype == torch.long and int(codes.max()) < 64
    again = build_tokenizer({"path": str(vq_dir)}).encode(pixels)
    assert torch.equal(codes, again)  # the saved codebook is the trained one
    recon = tok.decode_pixels(codes)
    assert float((recon.clamp(0, 1) - pixels).pow(2).mean()) < 0.01


def test_untrained_codebook_is_refused(tmp_path):
    tok = ImageVQTokenizer(codebook_size=16)
    with pytest.raises(ValueError, match="untrained"):
        tok.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="untrained"):
        tok.save_pretrained(tmp_path)


def test_codebook_head_cfg_and_generators():
    torch.manual_seed(0)
    head = CodebookHead(cond_dim=8, vocab_size=32)
    cond, uncond = torch.randn(6, 8), torch.randn(6, 8)

    def draw(**kw):
        return head.sample(cond, generator=[torch.Generator().manual_seed(i) for i in range(6)], **kw)

    assert torch.equal(draw(uncond=uncond, guidance_scale=1.0), draw())
    assert torch.equal(head.sample(cond, temperature=0), head.net(cond).argmax(-1))
    both = draw()
    alone = head.sample(cond[2:3], generator=[torch.Generator().manual_seed(2)])
    assert both[2] == alone[0]
    target = torch.randint(0, 32, (6,))
    assert head.loss(cond, target) > 0


def _old_codebook_sample(head, cond, uncond=None, guidance_scale=1.0, temperature=1.0, generator=None, top_k=None):
    """CodebookHead.sample as it was before it used the text sampler's warpers (its own top-k), verbatim."""
    logits = head.net(cond).float()
    if uncond is not None:
        u = head.net(uncond).float()
        logits = u + guidance_scale * (logits - u)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    k = head.top_k if top_k is None else top_k
    if k:
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("per_row", [False, True])
def test_codebook_top_k_draws_what_its_own_top_k_drew(per_row):
    """The shared warpers (transformers' TopKLogitsWarper) give the same codes for the same seeds as the
    head's former top-k, with and without guidance, at several k and temperatures."""
    torch.manual_seed(0)
    head = CodebookHead(cond_dim=8, vocab_size=64, top_k=7)
    cond, uncond = torch.randn(16, 8), torch.randn(16, 8)

    def gens(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(16)] if per_row \
            else torch.Generator().manual_seed(seed)

    checked = 0
    for top_k in (None, 0, 1, 3, 64):
        for temperature in (0.0, 0.6, 1.0, 1.7):
            for kw in ({}, {"uncond": uncond, "guidance_scale": 3.0}):
                for seed in range(3):
                    new = head.sample(cond, temperature=temperature, generator=gens(seed), top_k=top_k, **kw)
                    old = _old_codebook_sample(head, cond, temperature=temperature, generator=gens(seed),
                                               top_k=top_k, **kw)
                    assert torch.equal(new, old), (top_k, temperature, kw.keys(), seed)
                    checked += 1
    assert checked == 120
    # k really restricts the draws: with k = 1 every code is the argmax, without k they spread
    free = head.sample(cond.repeat(8, 1), top_k=0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(free, head.net(cond.repeat(8, 1)).argmax(-1))
    assert torch.equal(head.sample(cond, top_k=1, generator=torch.Generator().manual_seed(0)),
                       head.net(cond).argmax(-1))


def _nucleus(logits: torch.Tensor, top_p: float) -> list[set[int]]:
    """Each row's smallest set of codes whose probabilities add up to top_p (written out, not the warper)."""
    out = []
    for row in logits.softmax(-1):
        probs, order = row.sort(descending=True)
        keep = int((probs.cumsum(0) < top_p).sum()) + 1
        out.append(set(order[:keep].tolist()))
    return out


def test_codebook_top_p_keeps_the_nucleus_for_codes_as_for_text():
    from mmar.generation.logits import TopP
    torch.manual_seed(1)
    head = CodebookHead(cond_dim=8, vocab_size=64, top_p=0.5)
    cond = torch.randn(4, 8).repeat(50, 1)  # 4 conditions, 50 draws each
    logits = head.net(cond).float()
    nucleus = _nucleus(logits, 0.5)
    drawn = head.sample(cond, generator=torch.Generator().manual_seed(0))  # the head's own top_p
    assert all(int(c) in keep for c, keep in zip(drawn, nucleus))
    assert len({int(c) for c in drawn[0::4]}) > 1  # still a draw, not the argmax
    free = head.sample(cond, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert any(int(c) not in keep for c, keep in zip(free, nucleus))  # without it codes leave the nucleus
    assert torch.equal(head.sample(cond, top_p=1e-6), logits.argmax(-1))
    # the same warper the text sampler applies (temperature 1): the same masked logits
    kept = TopP(0.5)(logits.clone(), None)
    assert [set(torch.nonzero(r > float("-inf")).flatten().tolist()) for r in kept] == nucleus
    # a config's head spec sets it
    from mmar.heads import build_head
    assert build_head({"name": "codebook", "top_p": 0.9}, cond_dim=8, vocab_size=64).top_p == 0.9


def test_model_with_discrete_tokens_trains_saves_and_generates(vq_dir, tmp_path):
    mods = {"image": {"tokenizer": {"path": str(vq_dir)}, "head": {"width": 32}}}
    model, proc = make_tiny(modalities=mods)
    assert model.config.modalities["image"].vocab_size == 64
    assert model.config.modalities["image"].head["name"] == "codebook"
    assert isinstance(model.projections["image"], torch.nn.Embedding)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    batch = proc([[Message("user", "draw a 3"), Message("assistant", [Image(img)])]])
    assert batch["values"]["image"].dtype == torch.long
    out = model(**batch)
    assert out.modality_losses["image"] > 0
    out.loss.backward()
    assert model.projections["image"].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    loaded, proc2 = MMARModel.from_pretrained(tmp_path / "m").eval(), MMARProcessor.from_pretrained(tmp_path / "m")
    p = proc2.collate([proc2.encode([Message("user", "draw a 3")], add_generation_prompt=True,
                                    start_modality="image")], padding_side="left")
    kw = dict(mode="image", guidance_scale=2.0, max_items=1, max_new_tokens=2)
    a = generate(loaded, p["input_ids"], p["attention_mask"], generator=[torch.Generator().manual_seed(0)], **kw)
    b = generate(loaded, p["input_ids"], p["attention_mask"], generator=[torch.Generator().manual_seed(0)],
                 use_cache=False, **kw)
    codes = a.segments[0][0][1]
    assert codes.shape == (16,) and codes.dtype == torch.long and torch.equal(codes, b.segments[0][0][1])
    assert proc2.decode_item("image", codes).size == (8, 8)


def test_demo_summary_of_a_codebook_model(vq_dir):
    """`mmar demo`'s Model tab on an image-vq model: its tokens are codes, not vectors (no token_dim)."""
    pytest.importorskip("gradio")
    from mmar.pipeline import MMARPipeline
    from mmar.app.demo import model_summary

    model, proc = make_tiny(modalities={"image": {"tokenizer": {"path": str(vq_dir)}, "head": {"width": 32}}})
    assert model.config.modalities["image"].kind == "discrete" and model.config.modalities["image"].token_dim is None
    text = model_summary(MMARPipeline(model, proc))
    assert "| image tokenizer | `image-vq`" in text and "16 tokens (codes out of 64) per image" in text
    assert "| image head | `codebook`" in text
