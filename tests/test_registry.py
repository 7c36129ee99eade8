"""The small helpers the duplicate code became: the class registry behind heads and tokenizers, the
built-in datasets' shared base, and a tokenizer's config file; each keeps the old messages and files."""

import json

import pytest

from mmar.data.task import TaskDataset
from mmar.registry import Registry
from mmar.tokenizers import ModalityTokenizer, build_tokenizer


def test_registry_names_refuses_or_replaces_and_lists_the_known():
    reg = Registry("widget", unique=True)

    @reg.register("a")
    class A:
        pass

    assert A.name == "a" and reg.lookup("a") is A and reg.names() == ["a"]
    reg.register("a")(A)  # the same class again is fine
    with pytest.raises(ValueError, match="widget name 'a' is already registered by A"):
        reg.register("a")(type("B", (), {}))
    with pytest.raises(ValueError, match=r"^f.json: unknown widget 'z'; registered: a$"):
        reg.lookup("z", where="f.json: ")
    loose = Registry("head")
    first, second = loose.register("h")(type("H1", (), {})), loose.register("h")(type("H2", (), {}))
    assert loose.lookup("h") is second is not first  # heads: a later class replaces the earlier


def test_unknown_names_in_saved_tokenizer_configs_name_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name": "nope"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: unknown tokenizer 'nope'; registered: .*image-patch"):
        ModalityTokenizer.from_pretrained(tmp_path)


def test_tokenizer_config_file_is_the_one_written_before(tmp_path):
    tok = build_tokenizer({"name": "image-patch", "image_size": [8, 12], "patch_size": 2, "sizes": [[8, 12], [8, 8]]})
    tok.save_pretrained(tmp_path)
    old = json.dumps({"name": "image-patch", **tok.config()}, indent=2)  # the former save_pretrained's text
    assert (tmp_path / "tokenizer_config.json").read_text() == old
    assert tok.config()["sizes"] == [[8, 12], [8, 8]]
    back = ModalityTokenizer.from_pretrained(tmp_path)
    assert back.config() == tok.config() and back.num_tokens() == 24 and back.num_tokens((8, 8)) == 16


@pytest.mark.parametrize("known, message", [
    (("t2i", "i2t"), "unknown sample kinds ['x']; expected 't2i' and / or 'i2t'"),
    (("t2a", "a2t"), "unknown sample kinds ['x']; expected 't2a' and / or 'a2t'"),
    (("t2i", "i2t", "edit"), "unknown sample kinds ['x']; expected 't2i', 'i2t' and / or 'edit'"),
])
def test_task_datasets_refuse_unknown_kinds_with_the_old_messages(known, message):
    TaskDataset.check_kinds(known[:1], known)
    with pytest.raises(ValueError) as err:
        TaskDataset.check_kinds(("x", known[0]), known)
    assert str(err.value) == message


def test_seeded_index_is_the_former_per_dataset_index():
    import random
    rng = random.Random(3)
    old = [(kind, i, rng.randrange(1000)) for i in range(5) for kind in ("t2i", "i2t")]
    assert TaskDataset.seeded_index(5, ("t2i", "i2t"), 3) == old
