"""UMT5-XXL text encoder of Wan2.2-S2V: the official ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own key
layout) loaded into a transformers ``UMT5EncoderModel``, plus Wan's prompt cleaning and tokenisation.

Numerics versus Wan's own ``T5Encoder`` (checked line by line against transformers 5.x, see
tests/test_text.py for the bf16 bit-level comparison):

* bucket function, per-layer relative bias (UMT5 gives every layer its own table, which is Wan's
  ``shared_pos=False``), gated ``gelu_new`` (same tanh formula), no 1/sqrt(d) scaling, RMS norm with
  the mean of squares in fp32: identical.
* attention: forced to ``eager``. transformers would otherwise pick SDPA, whose fused kernels reorder
  the score/softmax arithmetic. Eager differs from Wan only in that it runs softmax on the bf16
  scores directly, where Wan upcasts to fp32 first; PyTorch's bf16 softmax accumulates in fp32 and
  rounds once, so the results agree bit for bit in practice (the test checks it).
* masking: Wan overwrites masked logits' bias with finfo.min, transformers adds finfo.min; both
  saturate to finfo.min, so masked keys get weight exactly 0 either way.
* ``_keep_in_fp32_modules = ["wo"]`` only applies in ``from_pretrained``; this loader keeps every
  weight in the requested dtype, as Wan does (the FFN output projection runs in bf16).
"""
from __future__ import annotations

import copy
import html
import logging
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.checkpoint import load_torch_state_dict, read_safetensors_header
from runtime.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # heavy imports stay lazy
    from transformers import UMT5Config, UMT5EncoderModel

log = logging.getLogger(__name__)

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
TEXT_LEN = 512

# Official S2V default negative prompt (wan/configs/wan_s2v_14B.py ``sample_neg_prompt``); used when the
# user's negative prompt is the empty string. Differs from the shared Wan default.
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class WanT5Config:
    """Wan's ``T5Encoder`` hyper-parameters (defaults: ``umt5_xxl`` encoder)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    max_distance: int = 128  # hard-coded in Wan's T5RelativeEmbedding
    eps: float = 1e-6  # hard-coded in Wan's T5LayerNorm

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config") -> "WanT5Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown T5 config key {unknown[0]!r}; expected a subset of {sorted(known)}")
        out = cls(**cfg)
        if out.shared_pos:
            # One bias table for all layers is T5 v1.1, not UMT5; UMT5EncoderModel cannot express it.
            raise ConfigError(f"{source}: shared_pos=True is not supported (UMT5 uses a per-layer position bias)")
        if out.dim_attn % out.num_heads:
            raise ConfigError(f"{source}: dim_attn {out.dim_attn} is not divisible by num_heads {out.num_heads}")
        return out


UMT5_XXL = WanT5Config()


def umt5_config_from_wan(cfg: WanT5Config | dict[str, Any] = UMT5_XXL) -> "UMT5Config":
    """transformers ``UMT5Config`` computing exactly what Wan's ``T5Encoder`` with ``cfg`` computes."""
    from transformers import UMT5Config

    if isinstance(cfg, dict):
        cfg = WanT5Config.from_dict(cfg)
    hf = UMT5Config(
        vocab_size=cfg.vocab,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        dropout_rate=0.1,  # inactive in eval mode; kept equal to Wan's value
        layer_norm_epsilon=cfg.eps,
        feed_forward_proj="gated-gelu",  # -> dense_act_fn "gelu_new", Wan's tanh GELU
        is_encoder_decoder=True,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tokenizer_class="T5Tokenizer",
    )
    hf._attn_implementation = "eager"  # see module docstring
    return hf


# Wan key -> transformers UMT5EncoderModel key(s). The token embedding feeds both ``shared`` and the
# (tied) ``encoder.embed_tokens``; nothing is reshaped.
_TOP_LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
_BLOCK_KEYS: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_to_hf_keys(num_layers: int) -> dict[str, tuple[str, ...]]:
    """The complete rename table for a ``num_layers``-block encoder (24 layers: 242 Wan keys)."""
    table = dict(_TOP_LEVEL_KEYS)
    for i in range(num_layers):
        for wan, hf in _BLOCK_KEYS.items():
            table[f"blocks.{i}.{wan}"] = (f"encoder.block.{i}.{hf}",)
    return table


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _read_state_dict(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .pth (CPU, memory-mapped when the format allows) or .safetensors (read straight onto
    ``device``) file. Never runs code from the file; messages never quote its bytes."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; pass the checkpoint folder that holds {T5_CHECKPOINT}")
    if path.suffix != ".safetensors":
        return load_torch_state_dict(path, "T5 checkpoint")
    read_safetensors_header(path)  # validates before the reader sees it
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the T5 checkpoint ({type(err).__name__}); it is truncated or "
                              "corrupt, re-download it") from None


def load_umt5_encoder(
    path: str | Path,
    config: WanT5Config | dict[str, Any] | "UMT5Config" = UMT5_XXL,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> "UMT5EncoderModel":
    """Wan-layout T5 encoder weights -> eval-mode ``UMT5EncoderModel`` on ``device`` in ``dtype``.

    Strict: every file key must be consumed and every model tensor filled, shapes must agree. The
    model is built on the meta device and the (mmap'd) file tensors are assigned into it, so only the
    one copy of the weights (on ``device``, in ``dtype``) is ever materialised.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    hf_config = copy.deepcopy(config) if isinstance(config, UMT5Config) else umt5_config_from_wan(config)
    hf_config._attn_implementation = "eager"
    table = wan_to_hf_keys(hf_config.num_layers)
    sd = _read_state_dict(path, device)

    unexpected = [k for k in sd if k not in table]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); not a {hf_config.num_layers}-layer Wan T5 encoder")
    missing = [k for k in table if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing); the file is incomplete or not a Wan T5 encoder")

    with torch.device("meta"):
        model = UMT5EncoderModel(hf_config)
    expected = model.state_dict()

    hf_sd: dict[str, torch.Tensor] = {}
    for wan_key, hf_keys in table.items():
        tensor = sd[wan_key]
        want = tuple(expected[hf_keys[0]].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: key {wan_key!r} has shape {tuple(tensor.shape)}, expected {want} for this config")
        tensor = tensor.to(device=device, dtype=dtype)
        for hf_key in hf_keys:
            hf_sd[hf_key] = tensor

    # The table is the whole contract: anything the model has that it does not fill is a bug here.
    uncovered = sorted(set(expected) - set(hf_sd))
    if uncovered:
        raise CheckpointError(f"{path}: model tensor {uncovered[0]!r} has no source key in the rename table")
    model.load_state_dict(hf_sd, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one Parameter, so .to() moves it once
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: model tensor {leftover[0]!r} was not filled")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Prompt cleaning and tokenisation (Wan's HuggingfaceTokenizer with clean="whitespace").


def clean_prompt(text: str) -> str:
    """ftfy repair, HTML-unescape twice, strip, collapse every whitespace run to one space."""
    import ftfy
    import regex

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    # the third-party ``regex`` module, as official: its \s set is what Wan's tokens were produced with
    return regex.sub(r"\s+", " ", text).strip()


def resolve_negative_prompt(negative_prompt: str) -> str:
    """The official rule: an empty negative prompt means the S2V default."""
    return S2V_NEGATIVE_PROMPT if negative_prompt == "" else negative_prompt


def load_tokenizer(folder: str | Path):
    """The UMT5 tokenizer from a local folder (``<ckpt>/google/umt5-xxl``); never touches the network."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found; the checkpoint must contain {T5_TOKENIZER_DIR}/")
    try:
        # trust_remote_code=False: a tokenizer_config.json with an ``auto_map`` must never run code from the folder
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        if "custom code" in str(err) or "trust_remote_code" in str(err):
            raise CheckpointError(f"{folder}: the tokenizer config asks to run code from the folder (auto_map), which "
                                  "a checkpoint is never allowed to do; use the official google/umt5-xxl files") from None
        raise CheckpointError(f"{folder}: cannot load the UMT5 tokenizer ({_one_line(err)})") from err


def tokenize(tokenizer, prompts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean, append EOS, truncate and pad to ``text_len``: ``(ids, mask)`` int64 ``[B, text_len]``.

    Over-long prompts are truncated exactly as official (the first ``text_len - 1`` tokens + EOS), with a
    warning, since the tail of such a prompt silently has no effect.
    """
    cleaned = [clean_prompt(p) for p in prompts]
    for i, text in enumerate(cleaned):
        n = len(tokenizer(text, add_special_tokens=True).input_ids)
        if n > text_len:
            warnings.warn(f"prompt {i} has {n} tokens; only the first {text_len} (EOS included) are used", stacklevel=2)
    out = tokenizer(cleaned, padding="max_length", truncation=True, max_length=text_len,
                    add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


class TextEncoder:
    """Prompts -> per-prompt UMT5 context ``[L_i, dim]`` trimmed to the real length (tokens + EOS).

    The official pipeline calls this once per prompt (prompt, then negative prompt, batch 1 each). A
    list is encoded as one padded batch; rows are independent, but the bigger GEMMs may round
    differently in the last bf16 bit.
    """

    def __init__(self, model: "UMT5EncoderModel", tokenizer, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_len: int = TEXT_LEN,
        config: WanT5Config = UMT5_XXL,
    ) -> "TextEncoder":
        """``<ckpt>/models_t5_umt5-xxl-enc-bf16.pth`` + ``<ckpt>/google/umt5-xxl/``; bf16 as official."""
        ckpt_dir = Path(ckpt_dir)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = load_tokenizer(ckpt_dir / T5_TOKENIZER_DIR)
        model = load_umt5_encoder(ckpt_dir / T5_CHECKPOINT, config, dtype=dtype, device=device)
        return cls(model, tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        ids, mask = tokenize(self.tokenizer, list(prompts), self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]


__all__ = [
    "S2V_NEGATIVE_PROMPT", "T5_CHECKPOINT", "T5_TOKENIZER_DIR", "TEXT_LEN", "TextEncoder", "UMT5_XXL",
    "WanT5Config", "clean_prompt", "load_tokenizer", "load_umt5_encoder", "resolve_negative_prompt",
    "tokenize", "umt5_config_from_wan", "wan_to_hf_keys",
]
