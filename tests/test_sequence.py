import numpy as np
import pytest
import torch

from mmar import Image, Message, Text
from mmar.sequence import IGNORE, as_messages


def test_layout_and_labels(tiny, digit_image):
    model, proc = tiny
    img, _ = digit_image
    ids = proc.token_ids["image"]
    enc = proc.encode([Message("user", "draw the digit seven"), Message("assistant", [Image(img)])])
    n = proc.modality_tokenizers["image"].num_tokens()
    start = enc.input_ids.index(ids["start"])
    assert enc.input_ids[0] == proc.bos_id
    assert enc.input_ids[start + 1: start + 1 + n] == [ids["token"]] * n
    assert enc.input_ids[start + 1 + n] == ids["end"] and enc.input_ids[-1] == proc.eos_id
    # the user's prompt is not trained on; the assistant's image and EOS are
    assert all(label == IGNORE for label in enc.labels[:start])
    assert enc.labels[start:] == enc.input_ids[start:]
    assert len(enc.values["image"]) == 1 and enc.values["image"][0].shape == (n, 4)


def test_user_images_are_inputs_not_targets(tiny, digit_image):
    _, proc = tiny
    img, label = digit_image
    enc = proc.encode([Message("user", [Image(img), "which digit is this?"]), Message("assistant", str(label))])
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    assert proc.tokenizer.decode(trained[:-1]) == str(label) and trained[-1] == proc.eos_id


def test_drop_prompt_removes_only_user_text(tiny, digit_image):
    _, proc = tiny
    img, _ = digit_image
    sample = [Message("user", "draw the digit seven"), Message("assistant", [Image(img)])]
    dropped = proc.encode(sample, drop_prompt=True)
    assert dropped.input_ids[:2] == [proc.bos_id, proc.token_ids["image"]["start"]]


def test_generation_prompt_can_open_an_image(tiny):
    _, proc = tiny
    enc = proc.encode([Message("user", "draw a 3")], add_generation_prompt=True, start_modality="image")
    assert enc.input_ids[-1] == proc.token_ids["image"]["start"] and proc.eos_id not in enc.input_ids


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_and_keeps_values_in_placeholder_order(tiny, rng, side):
    _, proc = tiny
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    samples = [[Message("user", "draw four then three"), Message("assistant", [Image(a), Image(b)])],
               [Message("user", [Image(b), "read this digit"]), Message("assistant", "4")]]
    batch = proc(samples, padding_side=side)
    ph = proc.token_ids["image"]["token"]
    assert batch["input_ids"].shape[0] == 2
    assert int((batch["input_ids"] == ph).sum()) == batch["values"]["image"].shape[0] == 48
    pad_col = 0 if side == "left" else -1
    assert batch["attention_mask"][1, pad_col] == 0 and batch["attention_mask"][0].all()
    tok = proc.modality_tokenizers["image"]
    expected = torch.cat([tok.encode(tok.preprocess(x)[None])[0] for x in (a, b, b)])
    assert torch.equal(batch["values"]["image"], expected)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][real], torch.cat([torch.arange(int(r.sum())) for r in real]))


def test_bad_inputs_raise_clear_errors(tiny, digit_image):
    _, proc = tiny
    img, _ = digit_image
    with pytest.raises(ValueError, match="reserved token '<\\|image\\|>'"):
        proc.encode([Message("user", "draw <|image|> please")])
    with pytest.raises(ValueError, match="reserved token"):
        proc.encode([Message("user", "hi <|eos|>")])
    with pytest.raises(ValueError, match="empty text"):
        proc.encode([Message("user", "   ")])
    with pytest.raises(ValueError, match="image segment rejected: image is 16x16"):
        proc.encode([Message("user", [Image(np.zeros((16, 16), np.uint8)), "which digit?"])])
    with pytest.raises(ValueError, match="NaN"):
        proc.encode([Message("user", [Image(torch.full((1, 8, 8), float("nan")))])])
    with pytest.raises(ValueError, match="no audio tokenizer"):
        from mmar import Audio
        proc.encode([Message("user", [Audio(np.zeros(100), 16000)])])
    with pytest.raises(ValueError, match="unknown role"):
        Message("robot", "hi")
    with pytest.raises(ValueError, match="non-empty"):
        as_messages([])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        proc.encode([Message("user", [Image("/nowhere.png")])])


def test_bare_segments_are_one_assistant_turn():
    msgs = as_messages(["hello", Text("there")])
    assert len(msgs) == 1 and msgs[0].role == "assistant" and len(msgs[0].content) == 2
    chat = as_messages([{"role": "user", "content": ["hi"]}])
    assert chat[0].role == "user"


def test_chatml_markers_when_the_tokenizer_has_them(digit_image):
    from mmar import MMARProcessor, build_tokenizer
    from mmar.datasets.digits import all_texts
    from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer

    tok = train_bpe_tokenizer(all_texts() + ["user", "assistant"], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    add_modality_tokens(tok, ["image"])
    proc = MMARProcessor(tok, {"image": build_tokenizer({"name": "image-patch"})})
    img, _ = digit_image
    sample = [Message("user", [Image(img), "which digit is this?"]), Message("assistant", "7")]
    enc = proc.encode(sample)
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|bos|><|im_start|>user\n<|image_start|>") and "<|im_start|>assistant\n7<|im_end|>" in text
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE])
    assert trained == "7<|im_end|>" and proc.stop_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = proc.encode(sample[:1], add_generation_prompt=True, start_modality="image")
    assert tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n<|image_start|>")
    dropped = proc.encode([Message("user", "draw a 7"), Message("assistant", [Image(img)])], drop_prompt=True)
    assert dropped.input_ids[:2] == [proc.bos_id, proc.token_ids["image"]["start"]]  # = CFG's unconditional view
    with pytest.raises(ValueError, match="reserved token '<\\|im_start\\|>'"):
        proc.encode([Message("user", "<|im_start|>system")])
