"""Issue 10 item 9: bad sampling arguments are a clear ValueError naming the argument, raised once where
the generation settings are built (``GenerationDefaults``) — in ``generate()``, the pipeline, a saved
``generation_config.json`` and a training config's ``generation`` section alike — instead of a
``RuntimeError`` about probability tensors or shapes deep inside the sampler, or silent noise."""

import json
import math

import pytest
import torch

from mmar import Message
from mmar.generation import GenerationDefaults, generate
from mmar.pipeline import MMARPipeline

BAD = [
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("image_temperature", -0.5), ("image_temperature", math.nan),
    ("num_inference_steps", -3), ("num_inference_steps", 0), ("num_inference_steps", 2.5),
    ("max_new_tokens", -1), ("max_new_tokens", 3.0), ("max_new_tokens", True),
    ("min_new_tokens", -2), ("max_items", -1),
    ("guidance_scale", math.nan), ("guidance_scale", -math.inf),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan),
    ("top_k", -1), ("top_k", 1.5),
    ("use_cache", "yes"),
]


@pytest.mark.parametrize("name,value", BAD)
def test_settings_object_names_the_bad_argument(name, value):
    with pytest.raises(ValueError, match=name):
        GenerationDefaults(**{name: value})
    with pytest.raises(ValueError, match=name):  # dataclasses.replace validates too
        GenerationDefaults().replace(**{name: value})


def test_good_edge_values_are_accepted():
    s = GenerationDefaults(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=0, max_items=0,
                           guidance_scale=0.0, num_inference_steps=1, image_temperature=0.0)
    assert s.temperature == 0.0 and s.top_p == 1.0
    assert GenerationDefaults(num_inference_steps=None).num_inference_steps is None


def _prompt(proc, start=None):
    enc = [proc.encode([Message("user", "draw a 3")], add_generation_prompt=True, start_modality=start)]
    return proc.collate(enc, padding_side="left")


@pytest.mark.parametrize("name,value", [("temperature", -1.0), ("temperature", math.nan), ("top_p", 0.0),
                                        ("num_inference_steps", -3), ("max_new_tokens", -1), ("top_k", -4),
                                        ("guidance_scale", math.nan)])
def test_generate_refuses_before_sampling(tiny, name, value):
    model, proc = tiny
    b = _prompt(proc, start="image")
    with pytest.raises(ValueError, match=name):
        generate(model, b["input_ids"], b["attention_mask"], b["values"], mode="image", **{name: value})


def test_an_image_prompt_needs_room_for_its_item(tiny):
    model, proc = tiny
    b = _prompt(proc, start="image")
    with pytest.raises(ValueError, match="max_items must be >= 1 with mode='image'"):
        generate(model, b["input_ids"], b["attention_mask"], b["values"], mode="image", max_items=0)
    # text and auto modes may forbid items altogether
    out = generate(model, *(_prompt(proc)[k] for k in ("input_ids", "attention_mask")), mode="auto",
                   max_items=0, max_new_tokens=3, temperature=0.0, decode_text=proc.decode_text)
    assert out.segments[0] and all(isinstance(s, str) for s in out.segments[0])


def test_unknown_setting_is_named(tiny):
    model, proc = tiny
    b = _prompt(proc)
    with pytest.raises(TypeError, match="temprature"):
        generate(model, b["input_ids"], b["attention_mask"], temprature=0.5)


def test_pipeline_validates_each_call_and_its_saved_config(tiny_dir, tmp_path):
    pipe = MMARPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="temperature"):
        pipe("draw a 3", temperature=-1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        next(pipe.stream("draw a 3", num_inference_steps=0))
    with pytest.raises(ValueError, match="max_items"):
        pipe("draw a 3", mode="image", max_items=0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="guidance"):
        pipe("draw a 3", guidance=2.0)
    pipe.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "top_p": 0}))
    with pytest.raises(ValueError, match=r"generation_config\.json: top_p must be > 0"):
        MMARPipeline.from_pretrained(tmp_path)


def test_training_config_generation_section_is_checked_up_front():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GenerationDefaults.for_model(None, temperature=-1)
