"""Generation: the settings object, the interleaved sampler and its logits processors.

``generate(model, input_ids, attention_mask, values, **settings)`` samples a left-padded batch;
:class:`GenerationDefaults` holds (and validates) the sampling settings, saved with a model as
``generation_config.json``; :mod:`.logits` has the text-token processors.
"""

from .config import DEFAULT_GUIDANCE, GENERATION_CONFIG_NAME, GenerationDefaults
from .logits import LogitsProcessor, LogitsProcessorList, build_processors
from .output import GenerationOutput
from .sampler import MODES, Sampler, generate

__all__ = ["DEFAULT_GUIDANCE", "GENERATION_CONFIG_NAME", "GenerationDefaults", "GenerationOutput",
           "LogitsProcessor", "LogitsProcessorList", "MODES", "Sampler", "build_processors", "generate"]
