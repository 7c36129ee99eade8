"""Shims over the transformers versions we support (``transformers>=5.0,<6``)."""

from __future__ import annotations

from dataclasses import fields

from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.24 renamed the KV cache, as a forward argument and as an output field, from
# ``past_key_values`` to ``cache``; the old name still works there but warns. We speak whichever this
# version uses natively.
CACHE = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"
