"""attn_implementation="xformers": its masks against SDPA's, and the full code path on CPU.

xformers has no CPU kernels, so the model-level tests swap ``memory_efficient_attention`` for a plain
reference that materializes the xformers bias (``AttentionBias.materialize``): everything of ours —
layouts, GQA expansion, the causal / padded / packed / cached biases — runs for real against SDPA.
"""

import warnings

import pytest
import torch

xformers = pytest.importorskip("xformers.ops.fmha.attn_bias", reason="xformers is not installed")
from xformers.ops.fmha.attn_bias import AttentionBias, BlockDiagonalCausalMask, LowerTriangularMask  # noqa: E402

from mmar import attention  # noqa: E402
from mmar.attention import packed_lengths, xformers_bias  # noqa: E402
from mmar.datasets import DigitsDataset  # noqa: E402
from mmar.generation import generate  # noqa: E402
from mmar.sequence import Message  # noqa: E402
from mmar.compat import CACHE  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402


def _sdpa_additive(mask_bool):
    return torch.zeros(mask_bool.shape).masked_fill(~mask_bool, float("-inf"))


def _hf_mask(model, embeds, attention_mask, position_ids):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=model.config.backbone_config, inputs_embeds=embeds,
                              attention_mask=attention_mask, position_ids=position_ids, **{CACHE: None})


def test_causal_bias_is_lower_triangular():
    bias, flatten = xformers_bias(None, 5, 5, 2, 3, torch.float32, "cpu")
    assert isinstance(bias, LowerTriangularMask) and not flatten
    expected = _sdpa_additive(torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(bias.materialize((5, 5)), expected)
    assert xformers_bias(None, 1, 7, 2, 3, torch.float32, "cpu")[0] is None  # one query with a cache: no mask


def test_padded_bias_equals_the_sdpa_mask(tiny):
    model, _ = tiny
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf = _hf_mask(model, torch.zeros(2, 6, 32), mask, pos)
    assert hf is not None and hf.dtype == torch.bool
    bias, flatten = xformers_bias(hf, 6, 6, 2, 4, torch.float32, "cpu", pos)
    assert not flatten and bias.shape == (2, 4, 6, 6)
    real = hf.any(-1, keepdim=True).expand(2, 4, 6, 6)  # queries that may see something
    assert torch.equal(bias[real], _sdpa_additive(hf).expand(2, 4, 6, 6)[real])
    assert (bias[~real] == 0).all()  # padding queries see everything instead of nothing: no NaN


def test_packed_bias_is_block_diagonal_and_equals_the_sdpa_mask(tiny):
    model, _ = tiny
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert packed_lengths(pos) == [3, 2, 1, 4, 2]
    hf = _hf_mask(model, torch.zeros(2, 6, 32), None, pos)  # transformers' packed-sequence mask
    bias, flatten = xformers_bias(hf, 6, 6, 2, 4, torch.float32, "cpu", pos)
    assert flatten and isinstance(bias, BlockDiagonalCausalMask)
    full = bias.materialize((12, 12))
    for b in range(2):
        assert torch.equal(full[6 * b: 6 * b + 6, 6 * b: 6 * b + 6], _sdpa_additive(hf[b, 0]))
    assert torch.isinf(full[:6, 6:]).all() and torch.isinf(full[6:, :6]).all()  # rows never see each other


def _reference_mea(q, k, v, attn_bias=None, p=0.0, scale=None):
    """memory_efficient_attention's contract, in plain torch: [B, M, H, K] in and out."""
    b, m, h, d = q.shape
    scores = torch.einsum("bmhk,bnhk->bhmn", q, k) * (scale if scale is not None else d ** -0.5)
    if isinstance(attn_bias, AttentionBias):
        scores = scores + attn_bias.materialize(scores.shape, dtype=scores.dtype)
    elif attn_bias is not None:
        scores = scores + attn_bias
    return torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v)


@pytest.fixture
def kernel(monkeypatch):
    import xformers.ops as xops

    calls = []

    def spy(*args, **kwargs):
        calls.append(type(kwargs.get("attn_bias")).__name__)
        return _reference_mea(*args, **kwargs)

    monkeypatch.setattr(xops, "memory_efficient_attention", spy)
    monkeypatch.setitem(attention._state, "ok", True)
    monkeypatch.setattr(attention, "KERNEL_DEVICES", {"cuda", "cpu"})
    return calls


def _pair():
    sdpa, proc = make_tiny(seed=3)
    xf, _ = make_tiny(seed=3)
    xf.set_attn_implementation("xformers")
    assert xf.backbone.config._attn_implementation == "xformers"
    return sdpa, xf, proc


def test_model_outputs_match_sdpa_padded_and_packed(kernel):
    sdpa, xf, proc = _pair()  # tiny config: 4 query heads, 2 key/value heads (GQA is expanded)
    ds = DigitsDataset()
    enc = [proc.encode(ds[i]) for i in range(0, 2000, 250)]
    padded, packed = proc.collate(enc), proc.pack(enc, 64)
    for batch in (padded, packed):
        args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        with torch.no_grad():
            a = sdpa(*args, values=batch["values"]).hidden_states
            b = xf(*args, values=batch["values"]).hidden_states
        assert torch.allclose(a, b, atol=1e-5)
    assert {"Tensor", "BlockDiagonalCausalMask"} <= set(kernel)


def test_cached_generation_matches_sdpa(kernel):
    sdpa, xf, proc = _pair()
    prompts = [[Message("user", "draw the digit seven")], [Message("user", "a 3 and then a 4:")]]
    b = proc.collate([proc.encode(p, add_generation_prompt=True, start_modality="image") for p in prompts],
                     padding_side="left")
    outs = []
    for model in (sdpa, xf):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        outs.append(generate(model, b["input_ids"], b["attention_mask"], b["values"], mode="image",
                             guidance_scale=2.0, max_items=1, max_new_tokens=3, generator=gens))
    assert outs[0].token_ids == outs[1].token_ids
    for ra, rb in zip(outs[0].segments, outs[1].segments):
        assert torch.allclose(ra[0][1], rb[0][1], atol=1e-4)
    assert kernel  # the xformers path really ran


def test_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.setitem(attention._state, "ok", False)
    monkeypatch.setitem(attention._state, "why", "a reason the test gives")
    monkeypatch.setitem(attention._state, "warned", False)
    monkeypatch.setattr(attention, "KERNEL_DEVICES", {"cuda", "cpu"})
    sdpa, xf, proc = _pair()
    batch = proc([DigitsDataset()[0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            a = xf(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states
            xf(batch["input_ids"], batch["attention_mask"], values=batch["values"])
    ours = [w for w in caught if "xformers" in str(w.message)]
    assert len(ours) == 1 and "using PyTorch SDPA instead" in str(ours[0].message)
    assert "a reason the test gives" in str(ours[0].message)  # the real reason, not a guess
    with torch.no_grad():
        assert torch.equal(a, sdpa(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states)


def test_cpu_tensors_fall_back_and_say_why(monkeypatch):
    monkeypatch.setitem(attention._state, "warned", False)
    _, xf, proc = _pair()
    batch = proc([DigitsDataset()[0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            xf(batch["input_ids"], batch["attention_mask"], values=batch["values"])
    assert any("xformers has no kernels for cpu tensors" in str(w.message) for w in caught)


def test_status_gives_the_real_reason():
    ok, why = attention.xformers_status()
    assert isinstance(ok, bool) and why
    if not torch.cuda.is_available():
        assert not ok and "no CUDA device" in why
    problem = attention.extension_problem()  # this wheel's C++ extension, loaded or not, and why
    built = attention._build_info().get("torch")
    if problem:
        assert "did not load" in problem and (built is None or built in problem)
        assert torch.__version__ in problem or built is None


def test_env_reports_kernels_and_the_attention_each_part_runs(tiny_dir, capsys):
    from mmar.app.cli import main

    assert main(["env", "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "xformers      kernels " in out and ("kernels load" in out or "kernels do not load: " in out)
    assert "attn_implementation='xformers' -> " in out
    assert "backbone (llama): attn_implementation='sdpa' -> PyTorch SDPA" in out
    assert "image head (DiffusionHead): no attention" in out
    rows = dict(attention.attention_report(*_pair()[1:]))
    assert "xformers" in rows["backbone (llama)"]  # the model set to xformers says what really runs
