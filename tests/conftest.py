import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from mmar import MMARProcessor, build_model, build_tokenizer  # noqa: E402
from mmar.datasets.digits import all_texts, load_digit_split  # noqa: E402
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer  # noqa: E402

TINY_BACKBONE = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
TINY_MODALITIES = {"image": {"tokenizer": {"name": "image-patch", "image_size": 8, "patch_size": 2, "channels": 1},
                             "head": {"width": 32, "depth": 2, "num_inference_steps": 5}}}


def make_tiny(seed: int = 0, modalities=None, **config_kwargs):
    torch.manual_seed(seed)
    modalities = modalities or TINY_MODALITIES
    tok = train_bpe_tokenizer(all_texts(), vocab_size=300)
    add_modality_tokens(tok, modalities)
    model = build_model(dict(TINY_BACKBONE), tok, modalities, **config_kwargs).eval()
    # random (not zero) head outputs, so generation tests see the latents move
    for p in model.heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    proc = MMARProcessor(tok, {m: build_tokenizer(s["tokenizer"]) for m, s in modalities.items()})
    return model, proc


def modality_losses(model, batch, modality: str) -> tuple[float, float]:
    """The text loss and ``modality``'s loss of ``batch``, read with the same noise and timesteps (seed 123)."""
    torch.manual_seed(123)
    with torch.no_grad():
        o = model(**batch)
    return o.text_loss.item(), o.modality_losses[modality].item()


def assert_learns(model, batch, modality: str, monkeypatch, zero_ratio: float, steps: int = 100) -> None:
    """``steps`` AdamW steps (lr 3e-3) on ``batch``: the text loss ends below 0.5, the ``modality`` loss below
    ``zero_ratio`` times that of the same head with its output layer zeroed, and below 0.75 times the same
    head's with its condition (the backbone's hidden states) zeroed, i.e. the head uses its condition."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    text, loss = modality_losses(model, batch, modality)
    head = model.heads[modality].net.out
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    _, zero_output = modality_losses(model, batch, modality)
    with torch.no_grad():
        head.weight.copy_(saved[0])
        head.bias.copy_(saved[1])
    assert text < 0.5, text
    assert loss < zero_ratio * zero_output, (loss, zero_output)
    original = model.heads[modality].loss
    monkeypatch.setattr(model.heads[modality], "loss", lambda cond, target, mask=None: original(cond * 0, target, mask))
    assert loss < 0.75 * modality_losses(model, batch, modality)[1], loss
    monkeypatch.undo()


@pytest.fixture(scope="session")
def tiny():
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    model, proc = tiny
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture
def digit_image():
    from mmar.datasets.digits import load_digit_split

    x, y = load_digit_split("test")
    return x[0], int(y[0])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """A digits model that has really learned (configs/digits-quick.yaml, ~2 min on 2 cores; measured 98%
    text-to-image, 95% image-to-text, 100% interleaved on the held-out split).

    Trained once per test session; set MMAR_TEST_MODEL=DIR to reuse a trained directory."""
    import pathlib

    from mmar.cli import main

    given = os.environ.get("MMAR_TEST_MODEL")
    if given:
        return pathlib.Path(given)
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("digits_quick")
    assert main(["train", "--config", str(root / "configs" / "digits-quick.yaml"), "--output_dir", str(out),
                 "--progress", "false"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_digits_2x2(tmp_path_factory):
    """The 16-token quick digits model (configs/digits-quick-2x2.yaml, ~1 min on 2 cores), trained once per
    session: speculative decoding's trained-model test needs more tokens per image than 4."""
    import pathlib

    from mmar.cli import main

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("digits_quick_2x2")
    assert main(["train", "--config", str(root / "configs" / "digits-quick-2x2.yaml"), "--output_dir", str(out),
                 "--progress", "false"]) == 0
    return out


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A user's dataset: 40 image-to-text and text-to-image chats with relative image paths, plus 2 bad records."""
    root = tmp_path_factory.mktemp("user_data")
    (root / "imgs").mkdir()
    x, y = load_digit_split("train")
    with open(root / "chats.jsonl", "w") as f:
        for i in range(40):
            PILImage.fromarray(x[i]).save(root / "imgs" / f"{i}.png")
            if i % 2:
                rec = [{"role": "user", "content": [{"type": "image", "path": f"imgs/{i}.png"},
                                                    {"type": "text", "text": "which digit is this?"}]},
                       {"role": "assistant", "content": str(y[i])}]
            else:
                rec = [{"role": "user", "content": f"draw a {y[i]}"},
                       {"role": "assistant", "content": [{"type": "image", "path": f"imgs/{i}.png"}]}]
            f.write(json.dumps({"messages": rec}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/gone.png"}]},
                                         {"role": "assistant", "content": "1"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "type <|image|> here"},
                                         {"role": "assistant", "content": "no"}]}) + "\n")
    return root / "chats.jsonl"
