"""The Gradio demo, served on 127.0.0.1 with a trained digits model: driven through gradio_client
(chat with an uploaded digit, generate images) and through a real headless Chromium."""

import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image as PILImage

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from mmar.datasets.digits import load_digit_split  # noqa: E402
from mmar.demo import build_demo, digits_examples, launch, model_summary  # noqa: E402
from mmar.eval.digits import parse_digit  # noqa: E402
from mmar.pipeline import MMARPipeline  # noqa: E402

N_CHAT = 12  # held-out digits asked about


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(trained_digits):
    p = MMARPipeline.from_pretrained(trained_digits)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    chat_examples, prompt_examples = digits_examples(str(tmp_path_factory.mktemp("examples")))
    demo = build_demo(pipe, max_new_tokens=16, max_prompt_chars=100, max_images=4, queue_size=8,
                      chat_examples=chat_examples, prompt_examples=prompt_examples)
    port = _free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _texts(history: list[dict], role: str) -> list[str]:
    return [part["text"] for msg in history if msg["role"] == role for part in msg["content"] if part["type"] == "text"]


def _files(history: list[dict], role: str) -> list[str]:
    return [part["file"] for msg in history if msg["role"] == role for part in msg["content"] if part["type"] == "file"]


def test_api_lists_the_two_endpoints(client):
    assert {"/chat", "/generate"} <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])


def test_chat_reads_uploaded_digits(client, pipe, tmp_path):
    """An upload reaches the model exactly as the pipeline reads it: each of the demo's greedy answers is
    the pipeline's own answer for the same image, and the model reads most held-out digits right."""
    x, y = load_digit_split("test")
    right = 0
    for i in range(N_CHAT):
        path = tmp_path / f"digit{i}.png"
        PILImage.fromarray(x[i]).resize((64, 64), PILImage.NEAREST).save(path)  # any size: the demo fits it
        history, _ = client.predict({"text": "which digit is this?", "files": [gradio_client.handle_file(str(path))]},
                                    [], 0.0, 8, 3.0, False, api_name="/chat")
        assert _texts(history, "user") == ["which digit is this?"] and len(_files(history, "user")) == 1
        answer = "".join(_texts(history, "assistant"))
        expected = pipe.chat([{"role": "user", "content": [{"type": "image", "image": pipe.load_image(str(path))},
                                                           {"type": "text", "text": "which digit is this?"}]}],
                             temperature=0.0, guidance_scale=3.0, max_new_tokens=8)
        assert answer == "".join(p for p in expected if isinstance(p, str)), f"digit {i}"
        right += parse_digit(answer) == int(y[i])
    # the quick test model reads about 3 in 4 held-out digits (chance: 1 in 10); configs/digits.yaml 98.6%
    assert right >= N_CHAT // 2, f"{right}/{N_CHAT} digits read right"


def test_chat_draws_an_image_and_keeps_the_history(client):
    history, _ = client.predict({"text": "draw the digit seven", "files": []}, [], 1.0, 8, 3.0, True, api_name="/chat")
    drawn = _files(history, "assistant")
    assert len(drawn) == 1 and os.path.isfile(drawn[0])
    assert PILImage.open(drawn[0]).size[0] >= 128  # shown scaled up
    # a second turn about the drawn image: the client sends the history back (its files uploaded again)
    resent = [{"role": m["role"], "content": [{"type": "file", "file": gradio_client.handle_file(p["file"])}
                                              if p["type"] == "file" else p for p in m["content"]]} for m in history]
    history, _ = client.predict({"text": "which digit is this?", "files": []}, resent, 0.0, 8, 3.0, True,
                                api_name="/chat")
    assert len(_texts(history, "assistant")) == 1 and parse_digit(_texts(history, "assistant")[0]) is not None
    # without memory each message stands alone: a drawing request after a question still gets a drawing
    resent = [{"role": m["role"], "content": [p for p in m["content"] if p["type"] == "text"]} for m in history]
    history, _ = client.predict({"text": "draw the digit three", "files": []}, resent, 1.0, 8, 3.0, False,
                                api_name="/chat")
    assert history[-1]["role"] == "assistant" and history[-1]["content"][0]["type"] == "file"


def test_generate_returns_image_files(client, pipe):
    """The Generate tab shows exactly the pipeline's images for the same prompt, settings and seeds (seed 5 + i
    for image i), scaled up by nearest neighbour."""
    import torch

    out = client.predict("draw the digit seven", 3.0, 10, 5, 3, api_name="/generate")
    assert [o["caption"] for o in out] == ["seed 5", "seed 6", "seed 7"]
    images = [PILImage.open(o["image"]) for o in out]
    assert all(os.path.isfile(o["image"]) for o in out) and all(im.size == (160, 160) for im in images)
    arrays = [np.asarray(im.convert("L")) for im in images]
    assert not np.array_equal(arrays[0], arrays[1])  # one seed per image
    expected = pipe(["draw the digit seven"] * 3, mode="image", max_items=1, guidance_scale=3.0,
                    num_inference_steps=10, generator=[torch.Generator().manual_seed(5 + i) for i in range(3)])
    for got, imgs in zip(arrays, expected.images):
        small = np.asarray(imgs[0].convert("L"))
        assert small.std() > 0  # not blank
        assert np.array_equal(got, np.asarray(imgs[0].convert("L").resize((160, 160), PILImage.NEAREST))), \
            "the demo's image is not the pipeline's"


def test_limits_give_clear_errors(client):
    with pytest.raises(Exception, match="at most 100"):
        client.predict("x" * 150, 3.0, 10, 0, 1, api_name="/generate")
    with pytest.raises(Exception, match="Type a message or attach a file"):
        client.predict({"text": "  ", "files": []}, [], 0.0, 8, 3.0, False, api_name="/chat")


def test_model_summary(pipe):
    text = model_summary(pipe, {"queue_size": 8})
    n = sum(p.numel() for p in pipe.model.parameters())
    assert f"{n / 1e6:.2f}M" in text and "llama" in text and "image-patch" in text and "queue size 8" in text


# -- a real browser ---------------------------------------------------------------------------------
def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium not available: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def test_browser_generate_tab(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 60)
        tab = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[@role='tab'][contains(., 'Generate')]")))
        tab.click()
        box = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#gen-prompt textarea, #gen-prompt input")))
        box.clear()
        box.send_keys("draw the digit seven")
        browser.find_element(By.CSS_SELECTOR, "#gen-button").click()
        started = time.time()
        loaded = "return arguments[0].complete && arguments[0].naturalWidth"
        images = wait.until(lambda b: [im for im in b.find_elements(By.CSS_SELECTOR, "#gen-gallery img")
                                       if b.execute_script(loaded, im)])
        assert len(images) == 4 and time.time() - started < 60
        shot = tmp_path / "generate_tab.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        png = PILImage.open(shot)
        assert png.size[0] >= 1000 and np.asarray(png.convert("L")).std() > 10
    finally:
        browser.quit()


def test_chat_handler_takes_and_returns_audio(tmp_path):
    """The Chat tab with an audio model: an uploaded WAV goes in, a generated clip comes back as a file."""
    import torch
    from tests.conftest import make_tiny
    from tests.test_chat import AUDIO

    from mmar.demo import _Handlers
    from mmar.media import save_wav
    from mmar.sequence import Audio

    model, proc = make_tiny(modalities=AUDIO)
    pipe = MMARPipeline(model, proc)
    pipe.set_progress_bar_config(disable=True)
    wav = save_wav(Audio(np.sin(np.arange(1024) / 5.0) * 0.5, 8000), tmp_path / "in.wav")
    handlers = _Handlers(pipe, max_new_tokens=4, max_prompt_chars=100, max_images=2)
    start = proc.token_ids["audio"]["start"]
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight[start] += 5.0  # make the untrained model answer with a clip
    try:
        updates = list(handlers.chat({"text": "say it again", "files": [wav]}, [], 1.0, 4, 1.0, True))
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    history = updates[-1][0]
    assert history[0] == {"role": "user", "content": {"path": wav, "alt_text": "audio"}}
    reply = [p for p in history[-1]["content"] if isinstance(p, dict)]
    assert history[-1]["role"] == "assistant" and reply and reply[0]["path"].endswith(".wav")
    with pytest.raises(gr.Error, match="takes no images"):
        list(handlers.chat({"text": "hi", "files": [str(tmp_path / "x.png")]}, [], 1.0, 4, 1.0, False))
