"""Quantized backbones on CPU (optimum-quanto through transformers' QuantoConfig): int8 weight-only
inference through the pipeline, and QLoRA (LoRA on an int4 base) whose adapter reloads and merges."""

import pytest
import torch

pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install 'mmar[quantization]')")

from mmar import MMARModel  # noqa: E402
from mmar.app.cli import main  # noqa: E402
from mmar.datasets import DigitsDataset  # noqa: E402
from mmar.pipeline import MMARPipeline  # noqa: E402
from mmar.quantization import load_quantized, quantization_config, weight_bytes  # noqa: E402
from mmar.training.lora import apply_lora  # noqa: E402


def _hidden(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states


def _kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in ("Linear", "QLinear")}


def test_int8_pipeline_quantizes_the_backbone_only_and_stays_close(tiny_dir):
    full = MMARPipeline.from_pretrained(tiny_dir)
    q8 = MMARPipeline.from_pretrained(tiny_dir, quantization="int8")
    kinds = _kinds(q8.model)
    assert kinds["backbone.model.layers.0.self_attn.q_proj"] == "QLinear"
    assert kinds["backbone.lm_head"] == "Linear" and kinds["projections.image.0"] == "Linear"
    assert all(v == "Linear" for k, v in kinds.items() if k.startswith("heads."))
    assert weight_bytes(q8.model) < weight_bytes(full.model)
    batch = full.processor([DigitsDataset()[i] for i in range(4)])
    a, b = _hidden(full.model, batch), _hidden(q8.model, batch)
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
    assert cos > 0.99, cos  # int8 weights: the same model up to rounding
    q8.set_progress_bar_config(disable=True)
    out = q8("draw a 3", mode="image", max_items=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0][0].size == (8, 8)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_quantized_model_keeps_no_page_of_its_checkpoint_file(tmp_path, tiny_dir):
    """transformers loads safetensors as a memory map; the full-precision tensors it keeps are views of it,
    so without :func:`release_checkpoint_file` the whole fp32 file stays mapped (and resident) beside the
    quantized weights. After loading, the file is mapped no more, and the model still computes the same."""
    import gc
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    model = load_quantized(str(copy), "int8")
    gc.collect()
    weights = str(copy / "model.safetensors")
    with open("/proc/self/maps") as f:
        assert not [line for line in f if weights in line]
    from mmar.quantization import release_checkpoint_file

    batch = MMARPipeline.from_pretrained(tiny_dir).processor([DigitsDataset()[i] for i in range(2)])
    before = _hidden(model, batch)
    release_checkpoint_file(model)  # copying again changes nothing
    assert torch.equal(before, _hidden(model, batch))


def test_bad_quantization_names_the_problem(tiny_dir):
    with pytest.raises(ValueError, match="unknown 'int3'"):
        quantization_config("int3")
    with pytest.raises(TypeError, match="got int"):
        quantization_config(8)


def test_qlora_on_an_int4_base_trains_reloads_and_merges(tmp_path, tiny_dir, tiny):
    from peft import PeftModel

    _, proc = tiny
    base = load_quantized(str(tiny_dir), "int4")
    assert _kinds(base)["backbone.model.layers.0.mlp.down_proj"] == "QLinear"
    model = apply_lora(base, {"r": 4, "alpha": 8}, base_path=str(tiny_dir))
    ds = DigitsDataset()
    batch = proc([ds[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses  # the adapter learns on the frozen 4-bit base
    model.eval().save_pretrained(tmp_path / "adapter")
    proc.save_pretrained(tmp_path / "adapter")
    h = _hidden(model, batch)
    again = PeftModel.from_pretrained(load_quantized(str(tiny_dir), "int4"), tmp_path / "adapter").eval()
    assert torch.allclose(_hidden(again, batch), h, atol=1e-6)  # the adapter reloads onto the same base
    # merged into the full-precision base (QLoRA's usual end): a plain model, close to the 4-bit one
    assert main(["merge-lora", "--adapter", str(tmp_path / "adapter"), "--base", str(tiny_dir),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = MMARModel.from_pretrained(tmp_path / "merged").eval()
    assert set(_kinds(merged).values()) == {"Linear"}
    on_full = PeftModel.from_pretrained(MMARModel.from_pretrained(tiny_dir), tmp_path / "adapter").eval()
    assert torch.allclose(_hidden(merged, batch), _hidden(on_full, batch), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(_hidden(merged, batch).flatten(1), h.flatten(1)).min()
    assert cos > 0.9, cos


def test_qlora_from_the_cli(tmp_path, tiny_dir, chat_jsonl):
    out = tmp_path / "qlora"
    args = ["train", "--init_from", str(tiny_dir), "--quantization", "int4", "--lora", "{r: 4, alpha: 8}",
            "--dataset", "jsonl", "--data_files", str(chat_jsonl), "--max_steps", "6", "--batch_size", "8",
            "--learning_rate", "1e-2", "--warmup_steps", "1", "--logging_steps", "1", "--save_steps", "0",
            "--output_dir", str(out), "--progress", "false"]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").exists()
    assert main(["merge-lora", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    assert set(_kinds(MMARModel.from_pretrained(tmp_path / "merged")).values()) == {"Linear"}
    bad = args[:2] + args[4:6] + ["--init_from", str(tiny_dir), "--quantization", "int4", "--output_dir", str(out)]
    assert main([a for a in bad if a not in ("--lora", "{r: 4, alpha: 8}")]) == 2  # a quantized base needs LoRA
