"""Modality tokenizers, chosen by name in a config (see :mod:`mmar.tokenizers.base`)."""

from .audio_codec import AudioCodecTokenizer
from .audio_mel import AudioMelTokenizer
from .base import ModalityTokenizer, available_tokenizers, build_tokenizer, register_tokenizer
from .image_clip import ImageCLIPTokenizer
from .image_patch import ImagePatchTokenizer
from .image_vae import ImageVAETokenizer
from .image_vq import ImageVQTokenizer
from .text import (add_modality_tokens, marked_sizes, modality_token_ids, modality_tokens, size_token, size_token_ids,
                   train_bpe_tokenizer)

__all__ = ["ModalityTokenizer", "ImageCLIPTokenizer", "AudioCodecTokenizer", "AudioMelTokenizer", "ImagePatchTokenizer",
           "ImageVAETokenizer", "ImageVQTokenizer", "available_tokenizers", "build_tokenizer", "register_tokenizer",
           "add_modality_tokens", "marked_sizes", "modality_token_ids", "modality_tokens", "size_token",
           "size_token_ids", "train_bpe_tokenizer"]
