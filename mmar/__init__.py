"""mmar: unified multimodal autoregressive models (text LM head + per-token diffusion heads)."""

from . import attention  # noqa: F401  (registers attn_implementation="xformers")
from .config import MMARConfig, ModalitySpec
from .heads import available_heads, build_head, register_head
from .modeling import MMARModel, build_model
from .sequence import MMARProcessor
from .types import Audio, Image, Item, Message, Text, register_segment
from .tokenizers import available_tokenizers, build_tokenizer, register_tokenizer

__version__ = "0.1.0"
__all__ = ["MMARConfig", "ModalitySpec", "MMARModel", "MMARProcessor", "build_model", "Text", "Image", "Audio",
           "Item", "Message", "register_segment", "available_heads", "build_head", "register_head",
           "available_tokenizers", "build_tokenizer", "register_tokenizer"]
