"""LoRA adapter directories load everywhere a model directory does; one base serves several adapters."""

import json
import shutil

import pytest
import torch

from mmar import MMARModel, MMARProcessor, build_tokenizer
from mmar.adapters import load_peft_model
from mmar.cli import main
from mmar.datasets import DigitsDataset
from mmar.datasets.digits import all_texts
from mmar.pipeline import MMARPipeline
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer
from mmar.training.lora import apply_lora
from tests.conftest import TINY_MODALITIES


IN_MEMORY = {}  # adapter directory -> the PeftModel it was saved from (still in memory)


def _make_adapter(base_dir, out, seed):
    """A LoRA adapter on ``base_dir`` whose weights (LoRA matrices, head copies, token rows) are random."""
    model = apply_lora(MMARModel.from_pretrained(base_dir), {"r": 4, "alpha": 8}, base_path=str(base_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out)
    MMARProcessor.from_pretrained(base_dir).save_pretrained(out)
    IN_MEMORY[str(out)] = model.eval()
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("adapters")
    return _make_adapter(tiny_dir, root / "a", 1), _make_adapter(tiny_dir, root / "b", 2)


@pytest.fixture(scope="module")
def batch(tiny_dir):
    proc = MMARProcessor.from_pretrained(tiny_dir)
    return proc([DigitsDataset()[i] for i in range(4)])


def _hidden(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states


def _outputs(model, batch, cond=None):
    """What the model makes of ``batch``: its hidden states, the LM head's logits on them, and its image
    head's noise prediction for fixed noise and timesteps plus a 3-step sample from fixed noise, both for the
    condition ``cond`` (default: this model's own first 16 hidden states), so a head that differs shows even
    where the hidden states agree."""
    with torch.no_grad():
        h = model(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states
        cond = h.reshape(-1, h.shape[-1])[:16] if cond is None else cond
        head = model.heads["image"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(cond), head.token_dim, generator=g)
        t = torch.randint(0, 1000, (len(cond),), generator=g)
        sample = head.sample(cond, num_inference_steps=3, generator=torch.Generator().manual_seed(1))
        return {"hidden": h, "logits": model.lm_head(h), "head_prediction": head.net(x, t, cond), "head_sample": sample}


def _cond(batch, model):
    """A fixed head condition: ``model``'s first 16 hidden states of ``batch``."""
    h = _outputs(model, batch)["hidden"]
    return h.reshape(-1, h.shape[-1])[:16]


def _same(a, b, atol=None):
    """Every output equal (``atol=None``: bit for bit) or within ``atol``; the first that is not is named."""
    for k in a:
        if atol is None:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _all_differ(a, b, atol=1e-3):
    for k in a:
        assert not torch.allclose(a[k], b[k], atol=atol), f"{k} unchanged by the adapter"


def _latents(pipe):
    out = pipe("draw a 3", mode="image", output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.latents[0][0][1]


def test_adapter_directory_loads_like_a_model_directory(tiny_dir, adapters, batch):
    from peft import PeftModel

    pipe = MMARPipeline.from_pretrained(adapters[0])
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.model, MMARModel) and pipe.get_list_adapters() == ["default"]
    peft_model = PeftModel.from_pretrained(MMARModel.from_pretrained(tiny_dir), adapters[0]).eval()
    assert torch.equal(_hidden(pipe.model, batch), _hidden(peft_model, batch))
    base = MMARPipeline.from_pretrained(tiny_dir)
    base.set_progress_bar_config(disable=True)
    assert not torch.allclose(_hidden(pipe.model, batch), _hidden(base.model, batch), atol=1e-3)
    # hidden states, LM logits and the image head's outputs (for one fixed condition as well as for each
    # model's own hidden states): the in-memory model it was saved from = the reloaded adapter (both ways of
    # loading it, bit for bit) = the merged model (up to float rounding); the base differs in each
    in_memory = IN_MEMORY[str(adapters[0])]
    cond = _cond(batch, in_memory)
    for c in (None, cond):
        want = _outputs(in_memory, batch, c)
        _same(want, _outputs(pipe.model, batch, c))
        _same(want, _outputs(peft_model, batch, c))
        _all_differ(want, _outputs(base.model, batch, c))
    merged_dir = adapters[0].parent / "a_merged"
    assert main(["merge-lora", "--adapter", str(adapters[0]), "--output", str(merged_dir)]) == 0
    for c in (None, cond):
        _same(_outputs(in_memory, batch, c), _outputs(MMARModel.from_pretrained(merged_dir).eval(), batch, c), 1e-4)
    # the sampler uses the adapter's own head copy: generation equals the merged model's
    merged = peft_model.merge_and_unload().eval()
    for c in (None, cond):
        _same(_outputs(in_memory, batch, c), _outputs(merged, batch, c), 1e-4)
    assert not torch.allclose(_latents(pipe), _latents(base), atol=1e-3)
    assert torch.allclose(_latents(pipe), _latents(MMARPipeline(merged, pipe.processor)), atol=1e-4)


def test_one_base_serves_several_adapters(tiny_dir, adapters, batch):
    pipe = MMARPipeline.from_pretrained(tiny_dir)
    base_h = _hidden(pipe.model, batch)
    only = [_hidden(MMARPipeline.from_pretrained(a).model, batch) for a in adapters]
    assert pipe.load_lora_weights(adapters[0], adapter_name="a") == "a"
    assert pipe.load_lora_weights(adapters[1], adapter_name="b") == "b"
    assert pipe.get_list_adapters() == ["a", "b"] and pipe.get_active_adapters() == ["b"]
    assert torch.equal(_hidden(pipe.model, batch), only[1])
    pipe.set_adapters("a")
    assert torch.equal(_hidden(pipe.model, batch), only[0])
    pipe.set_adapters(["b"])
    assert torch.equal(_hidden(pipe.model, batch), only[1])
    pipe.disable_lora()
    assert torch.equal(_hidden(pipe.model, batch), base_h)
    pipe.enable_lora()
    assert torch.equal(_hidden(pipe.model, batch), only[1])
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        pipe.set_adapters("c")
    with pytest.raises(ValueError, match="one adapter can be active"):
        pipe.set_adapters(["a", "b"])
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(adapters[0], adapter_name="a")
    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == ["a"]
    pipe.set_adapters("a")
    assert torch.equal(_hidden(pipe.model, batch), only[0])
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == []
    assert torch.equal(_hidden(pipe.model, batch), base_h)
    assert not any("lora" in n or "modules_to_save" in n or "token_adapter" in n
                   for n, _ in pipe.model.named_modules())
    pipe.load_lora_weights(adapters[1])  # loads again after an unload
    _same(_outputs(IN_MEMORY[str(adapters[1])], batch), _outputs(pipe.model, batch))  # logits, head too
    pipe.fuse_lora()
    assert pipe.get_list_adapters() == [] and torch.allclose(_hidden(pipe.model, batch), only[1], atol=1e-5)
    _same(_outputs(IN_MEMORY[str(adapters[1])], batch), _outputs(pipe.model, batch), 1e-4)


def test_base_is_found_next_to_a_moved_adapter_and_saves_round_trip(tmp_path, tiny_dir, adapters, batch):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, tmp_path / "gone_base")
    _make_adapter(tmp_path / "gone_base", run, 1)
    shutil.move(tmp_path / "gone_base", run / "base")  # the recorded base path no longer exists
    pipe = MMARPipeline.from_pretrained(run)
    assert torch.equal(_hidden(pipe.model, batch), _hidden(load_peft_model(run, run / "base").eval(), batch))
    pipe.save_pretrained(tmp_path / "saved")  # adapters loaded: an adapter directory again
    assert (tmp_path / "saved" / "adapter_config.json").exists()
    assert not (tmp_path / "saved" / "config.json").exists()
    json_cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    json_cfg["base_model_name_or_path"] = str(run / "base")
    (tmp_path / "saved" / "adapter_config.json").write_text(json.dumps(json_cfg))
    again = MMARPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(_hidden(again.model, batch), _hidden(pipe.model, batch))


def test_bad_adapter_directories_give_clear_errors(tmp_path, tiny_dir, adapters):
    broken = tmp_path / "no_base"
    shutil.copytree(adapters[0], broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere"}))
    with pytest.raises(FileNotFoundError, match="base model not found"):
        MMARPipeline.from_pretrained(broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled adapters are not loaded"):
        MMARPipeline.from_pretrained(pickled)
    with pytest.raises(FileNotFoundError, match="no config.json or adapter_config.json"):
        MMARPipeline.from_pretrained(tmp_path)
    # an adapter of another base (other special-token ids) is refused by load_lora_weights
    other = tmp_path / "other"
    shutil.copytree(adapters[0], other)
    tok = train_bpe_tokenizer(all_texts(), vocab_size=280)  # a smaller text vocabulary: other ids
    add_modality_tokens(tok, ["image"])
    spec = TINY_MODALITIES["image"]["tokenizer"]
    MMARProcessor(tok, {"image": build_tokenizer(spec)}).save_pretrained(other)
    pipe = MMARPipeline.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="other special-token ids"):
        pipe.load_lora_weights(other)


def test_cli_generate_and_chat_take_an_adapter_directory(tmp_path, adapters, capsys):
    assert main(["generate", "--model", str(adapters[0]), "--prompt", "draw a 3", "--mode", "image",
                 "--num_inference_steps", "2", "--output", str(tmp_path / "gen")]) == 0
    record = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert record["outputs"][0]["files"] and (tmp_path / "gen" / "sample0_0.png").exists()
    assert main(["merge-lora", "--adapter", str(adapters[0]), "--output", str(tmp_path / "merged")]) == 0
    from mmar.app.demo import model_summary

    summary = model_summary(MMARPipeline.from_pretrained(adapters[0]))
    assert summary.startswith("**Model:** `") and "| backbone |" in summary and "| image head |" in summary
