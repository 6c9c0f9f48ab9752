"""The built-in tiny model (``--ckpt_dir tiny``): every component of the real architecture at toy width,
randomly initialised from a fixed seed, so the whole pipeline runs anywhere in about a minute.

Its output is noise-like video (the weights are random); it exists to exercise the code paths.
"""
from __future__ import annotations

import torch

from runtime.config import TINY_SEED, DiTConfig
from runtime.models.audio import Wav2Vec2Features
from runtime.models.dit import build_dit
from runtime.models.text import TextEncoder, WanT5Config, umt5_config_from_wan
from runtime.models.vae import VAEConfig, WanVAE

SEED = TINY_SEED
TEXT_DIM = DiTConfig.tiny().text_dim
AUDIO_DIM = DiTConfig.tiny().audio_dim


class ByteTokenizer:
    """A dependency-free stand-in for the UMT5 tokenizer: UTF-8 bytes + EOS, padded with 0.

    Implements the small part of the transformers tokenizer call that ``runtime.models.text.tokenize``
    uses (ids 0 = pad, 1 = EOS, as UMT5)."""

    vocab_size = 259

    class _Out:
        def __init__(self, ids, mask):
            self.input_ids, self.attention_mask = ids, mask

    def __call__(self, text, padding=None, truncation=False, max_length=None, add_special_tokens=True, return_tensors=None):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [[b + 3 for b in t.encode("utf-8")] + ([1] if add_special_tokens else []) for t in texts]
        if truncation and max_length:
            rows = [r[: max_length - 1] + [1] if len(r) > max_length else r for r in rows]
        if padding == "max_length" and max_length:
            masks = [[1] * len(r) + [0] * (max_length - len(r)) for r in rows]
            rows = [r + [0] * (max_length - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "pt":
            return self._Out(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))
        return self._Out(rows[0] if isinstance(text, str) else rows, masks[0] if isinstance(text, str) else masks)


def tiny_dit(dtype: torch.dtype = torch.float32, device="cpu"):
    # drawn on the CPU generator so the tiny model is the same on every device
    return build_dit(DiTConfig.tiny(), dtype=dtype, device="cpu", seed=SEED, std=0.05).to(device)


def tiny_vae(device="cpu") -> WanVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = WanVAE(VAEConfig.tiny())
    return vae.to(device).eval().requires_grad_(False)


def tiny_text_encoder(device="cpu", dtype: torch.dtype = torch.float32):
    from transformers import UMT5EncoderModel

    cfg = umt5_config_from_wan(WanT5Config(vocab=ByteTokenizer.vocab_size, dim=TEXT_DIM, dim_attn=TEXT_DIM, dim_ffn=2 * TEXT_DIM,
                                           num_heads=4, num_layers=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        model = UMT5EncoderModel(cfg)
    return TextEncoder(model.to(device, dtype).eval().requires_grad_(False), ByteTokenizer())


def tiny_audio_encoder(device="cpu"):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=AUDIO_DIM, num_hidden_layers=DiTConfig.tiny().audio_layers - 1, num_attention_heads=2,
                         intermediate_size=2 * AUDIO_DIM, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer",
                         conv_bias=True, vocab_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)
        model = Wav2Vec2Model(cfg)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=True)
    return Wav2Vec2Features(model.to(device).eval().requires_grad_(False), extractor, torch.device(device), torch.float32)
