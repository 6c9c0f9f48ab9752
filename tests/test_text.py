"""UMT5 text encoder: Wan-layout loading, numerics against an independent Wan-math reference, strict
loader errors, prompt cleaning, tokenisation and the TextEncoder front end (tiny models, CPU)."""
from __future__ import annotations

import io
import json
import logging
import math
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from runtime.errors import CheckpointError, ConfigError
from runtime.models import text as T
from tests.conftest import Payload, golden_dir, golden_manifest

SPECS = Path(__file__).resolve().parents[1].parent / "shared" / "specs"  # development checkout only
TINY = T.WanT5Config(vocab=160, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2, num_buckets=32)


# --- an independent reference written from the spec (§2.2), with Wan's module names -----------------


class _Norm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


class _Attn(nn.Module):
    def __init__(self, dim, dim_attn, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, mask, bias):
        b, n = x.shape[0], self.heads
        q, k, v = (f(x).view(b, x.shape[1], n, -1) for f in (self.q, self.k, self.v))
        full_bias = bias.expand(b, -1, -1, -1).masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        logits = torch.einsum("bqhc,bkhc->bhqk", q, k) + full_bias  # no 1/sqrt(d)
        w = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return self.o(torch.einsum("bhqk,bkhc->bqhc", w, v).reshape(b, x.shape[1], -1))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _GeluLinear(nn.Sequential):
    def __init__(self, dim, dim_ffn):
        super().__init__(nn.Linear(dim, dim_ffn, bias=False))

    def forward(self, x):
        return _gelu_tanh(self[0](x))


class _FFN(nn.Module):
    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = _GeluLinear(dim, dim_ffn)
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class _RelBias(nn.Module):
    def __init__(self, buckets, heads):
        super().__init__()
        self.embedding = nn.Embedding(buckets, heads)

    def forward(self, length):
        pos = torch.arange(length)
        rel = pos[None, :] - pos[:, None]  # key - query
        half = self.embedding.num_embeddings // 2
        exact = half // 2
        a = rel.abs()
        large = exact + (torch.log(a.float().clamp(min=1) / exact) / math.log(128 / exact) * (half - exact)).long()
        bucket = (rel > 0).long() * half + torch.where(a < exact, a, large.clamp(max=half - 1))
        return self.embedding(bucket).permute(2, 0, 1)[None]


class _Block(nn.Module):
    def __init__(self, c: T.WanT5Config):
        super().__init__()
        self.norm1, self.norm2 = _Norm(c.dim), _Norm(c.dim)
        self.attn = _Attn(c.dim, c.dim_attn, c.num_heads)
        self.ffn = _FFN(c.dim, c.dim_ffn)
        self.pos_embedding = _RelBias(c.num_buckets, c.num_heads)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask, self.pos_embedding(x.shape[1]))
        return x + self.ffn(self.norm2(x))


class WanT5Reference(nn.Module):
    def __init__(self, c: T.WanT5Config):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.num_layers))
        self.norm = _Norm(c.dim)

    def forward(self, ids, mask):
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def _reference(seed=0, cfg=TINY) -> WanT5Reference:
    torch.manual_seed(seed)
    ref = WanT5Reference(cfg)
    with torch.no_grad():  # non-trivial norms and a bias big enough to matter
        for name, p in ref.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.uniform_(0.5, 1.5)
            elif "pos_embedding" in name:
                p.normal_(0, 1.0)
    return ref.eval()


def _save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _ids_mask(lengths, total, vocab=TINY.vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n - 1] = 1
        ids[i, n:] = 0
    return ids, mask


# --- golden parity ---------------------------------------------------------------------------------


def test_golden_t5_parity():
    from runtime.golden_checks.t5 import check

    cases = check(golden_dir(), golden_manifest())
    assert cases and all(c.passed for c in cases), cases
    assert max(c.rel_l2 for c in cases) < 1e-5


# --- rename table and numerics ---------------------------------------------------------------------


def test_rename_table_is_complete_and_bijective():
    from transformers import UMT5EncoderModel

    wan_keys = set(_reference().state_dict())
    table = T.wan_to_hf_keys(TINY.num_layers)
    assert set(table) == wan_keys  # every Wan key maps, no invented keys
    targets = [k for hf in table.values() for k in hf]
    assert len(targets) == len(set(targets))  # no HF key filled twice
    with torch.device("meta"):
        hf = UMT5EncoderModel(T.umt5_config_from_wan(TINY))
    assert set(targets) == set(hf.state_dict())  # every HF tensor covered
    assert len(T.wan_to_hf_keys(24)) == 242  # the real file's tensor count


def test_real_config_matches_spec():
    hf = T.umt5_config_from_wan(T.UMT5_XXL)
    assert (hf.vocab_size, hf.d_model, hf.d_kv, hf.d_ff, hf.num_heads, hf.num_layers) == (256384, 4096, 64, 10240, 64, 24)
    assert (hf.relative_attention_num_buckets, hf.relative_attention_max_distance) == (32, 128)
    assert hf.dense_act_fn == "gelu_new" and hf.is_gated_act and hf.layer_norm_epsilon == 1e-6
    assert hf._attn_implementation == "eager"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loaded_model_matches_reference_fp32(tmp_path, suffix):
    ref = _reference()
    path = _save(ref.state_dict(), tmp_path / f"t5{suffix}")
    model = T.load_umt5_encoder(path, TINY, dtype=torch.float32, device="cpu")
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.shared.weight is model.encoder.embed_tokens.weight
    ids, mask = _ids_mask([150, 9, 1], 160)  # > 128 tokens: exercises the log buckets and their cap
    with torch.no_grad():
        want = ref(ids, mask)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_loaded_model_matches_reference_bf16(tmp_path):
    ref = _reference(seed=3).to(torch.bfloat16)
    path = _save(ref.state_dict(), tmp_path / "t5.pth")
    model = T.load_umt5_encoder(path, TINY, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # wo too (no fp32 island)
    ids, mask = _ids_mask([40, 17], 64)
    with torch.no_grad():
        want = ref(ids, mask).float()
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel  # measured 0 (bit-identical); bf16 rounding noise would be ~4e-3


def test_dtype_conversion_on_load(tmp_path):
    path = _save(_reference().to(torch.bfloat16).state_dict(), tmp_path / "t5.pth")
    model = T.load_umt5_encoder(path, TINY, dtype=torch.float32, device="cpu")
    assert model.shared.weight.dtype == torch.float32


def test_config_from_dict_rejects_unknown_and_shared_pos():
    assert T.WanT5Config.from_dict({"vocab": 10, "dim": 8}).dim == 8
    with pytest.raises(ConfigError, match="bogus"):
        T.WanT5Config.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="shared_pos"):
        T.WanT5Config.from_dict({"shared_pos": True})


# --- strict loader errors --------------------------------------------------------------------------


def _bad_file(tmp_path, edit) -> Path:
    sd = dict(_reference().state_dict())
    edit(sd)
    return _save(sd, tmp_path / "bad.pth")


def test_missing_key_is_named(tmp_path):
    path = _bad_file(tmp_path, lambda sd: sd.pop("blocks.1.ffn.fc2.weight"))
    with pytest.raises(CheckpointError, match=r"bad\.pth.*missing key 'blocks\.1\.ffn\.fc2\.weight'"):
        T.load_umt5_encoder(path, TINY, torch.float32)


def test_extra_key_is_named(tmp_path):
    path = _bad_file(tmp_path, lambda sd: sd.__setitem__("blocks.2.norm1.weight", torch.ones(TINY.dim)))
    with pytest.raises(CheckpointError, match=r"bad\.pth.*unexpected key 'blocks\.2\.norm1\.weight'"):
        T.load_umt5_encoder(path, TINY, torch.float32)


def test_wrong_shape_is_named(tmp_path):
    path = _bad_file(tmp_path, lambda sd: sd.__setitem__("blocks.0.attn.q.weight", torch.zeros(8, TINY.dim)))
    with pytest.raises(CheckpointError, match=r"bad\.pth.*'blocks\.0\.attn\.q\.weight'.*\(8, 16\)"):
        T.load_umt5_encoder(path, TINY, torch.float32)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_named(tmp_path, suffix):
    path = _save(_reference().state_dict(), tmp_path / f"cut{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix}.*truncated") as err:
        T.load_umt5_encoder(path, TINY, torch.float32)
    assert "\n" not in str(err.value)


def test_absent_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        T.load_umt5_encoder(tmp_path / "nope.pth", TINY)


# --- prompt cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  A   man\tsings\n\n loudly  ", "A man sings loudly"),
        ("Tom &amp;amp; Jerry &lt;3", "Tom & Jerry <3"),  # unescaped twice
        ("Caf\u00c3\u00a9 au lait", "Café au lait"),  # ftfy repairs mojibake
        ("Keep CASE, punctuation!?", "Keep CASE, punctuation!?"),
        ("全角\u3000空格\u00a0和\u2003空白", "全角 空格 和 空白"),  # unicode whitespace collapses too
        # ftfy's defaults (as official) also fold full-width forms, curly quotes and ligatures; note that
        # this turns the negative prompt's full-width commas into ASCII ones before tokenisation
        (T.S2V_NEGATIVE_PROMPT, T.S2V_NEGATIVE_PROMPT.replace("\uff0c", ",")),
        ("\u201cquoted\u201d \ufb01ne", '"quoted" fine'),
        ("", ""),
    ],
)
def test_clean_prompt(raw, clean):
    assert T.clean_prompt(raw) == clean


def test_negative_prompt_constant():
    neg = T.S2V_NEGATIVE_PROMPT
    assert len(neg) == 116 and neg.startswith("画面模糊，最差质量") and neg.endswith("背景人很多，倒着走")
    spec = SPECS / "wan_components_spec.md"
    if spec.is_file():
        assert f"`{neg}`" in spec.read_text()
    assert T.resolve_negative_prompt("") == neg
    assert T.resolve_negative_prompt("blurry") == "blurry"


# --- tokenizer + TextEncoder on a tiny SentencePiece model ------------------------------------------


_SENTENCES = [
    "A woman is singing on a stage with bright lights.",
    "The cat sits on the mat and watches the rain.",
    "一个女人在舞台上唱歌，灯光明亮。",
    "Un homme parle devant la caméra & sourit.",
]


def _make_tokenizer_dir(root: Path) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 10), model_writer=buf, vocab_size=90, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    folder = root / T.T5_TOKENIZER_DIR
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    _make_tokenizer_dir(root)
    torch.save(_reference().to(torch.bfloat16).state_dict(), root / T.T5_CHECKPOINT)
    return root


def test_tokenize_pads_truncates_and_appends_eos(tiny_ckpt):
    tok = T.load_tokenizer(tiny_ckpt / T.T5_TOKENIZER_DIR)
    ids, mask = T.tokenize(tok, ["A  woman\nsinging.", "cat"], text_len=32)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.int64
    for row_ids, row_mask in zip(ids, mask):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()  # right padding
        assert row_ids[n - 1] == 1 and (row_ids[: n - 1] != 1).all()  # one EOS, last real token
        assert (row_ids[n:] == 0).all()  # pad id 0
    # cleaning happens before tokenisation
    same, _ = T.tokenize(tok, ["A woman singing."], text_len=32)
    assert torch.equal(same[0], ids[0])


def test_long_prompt_warns_and_truncates(tiny_ckpt):
    tok = T.load_tokenizer(tiny_ckpt / T.T5_TOKENIZER_DIR)
    long = " ".join(_SENTENCES * 3)
    with pytest.warns(UserWarning, match="only the first 16"):
        ids, mask = T.tokenize(tok, [long], text_len=16)
    full = tok(T.clean_prompt(long)).input_ids
    assert mask.sum() == 16 and ids[0, -1] == 1
    assert ids[0, :15].tolist() == full[:15]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.tokenize(tok, ["short"], text_len=16)  # no warning when it fits


def test_text_encoder_end_to_end(tiny_ckpt):
    enc = T.TextEncoder.from_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float32, text_len=40, config=TINY)
    prompts = ["A woman is singing.", "  The cat   sits. "]
    out = enc.encode(prompts)
    ids, mask = T.tokenize(enc.tokenizer, prompts, 40)
    assert [o.shape for o in out] == [(int(m.sum()), TINY.dim) for m in mask]
    ref = _reference().to(torch.bfloat16).float()  # the saved weights, upcast like the loader does
    with torch.no_grad():
        want = ref(ids, mask)
    for o, w, m in zip(out, want, mask):
        torch.testing.assert_close(o, w[: int(m.sum())], rtol=1e-5, atol=1e-5)
    # one prompt at a time (the official call pattern) gives the same rows
    torch.testing.assert_close(enc.encode([prompts[1]])[0], out[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError):
        enc.encode("not a list")


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(CheckpointError, match="umt5-xxl"):
        T.TextEncoder.from_checkpoint(tmp_path, device="cpu", config=TINY)


# --- a checkpoint folder never runs code -----------------------------------------------------------

_EVIL_MODULE = '''
import pathlib
pathlib.Path(__file__).resolve().parent  # noqa
pathlib.Path({marker!r}).write_text("code from the checkpoint folder ran")
from transformers import T5Tokenizer


class EvilTokenizer(T5Tokenizer):
    pass
'''


@pytest.mark.parametrize("local_class", [False, True])
def test_tokenizer_auto_map_never_runs_code(tmp_path, monkeypatch, local_class):
    folder = _make_tokenizer_dir(tmp_path / "ckpt")
    marker = tmp_path / "ran.txt"
    (folder / "evil_tok.py").write_text(_EVIL_MODULE.format(marker=str(marker)))
    config = {"auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}, "extra_ids": 0,
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if local_class:
        config["tokenizer_class"] = "T5Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user who would say yes
    try:  # either transformers' own class serves (the folder's code is not imported) or loading is refused
        tok = T.load_tokenizer(folder)
        assert type(tok).__name__ != "EvilTokenizer"
    except CheckpointError as err:
        assert not local_class and "run code" in str(err) and "\n" not in str(err)
    assert not asked and not marker.exists()


def test_legacy_torch_format_loads(tmp_path, caplog):
    # torch.save(..., _use_new_zipfile_serialization=False): the pre-1.6 format cannot be memory-mapped
    ref = _reference(seed=5)
    path = tmp_path / "legacy.pth"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    with caplog.at_level(logging.INFO, logger="runtime.checkpoint"):
        model = T.load_umt5_encoder(path, TINY, dtype=torch.float32, device="cpu")
    assert "cannot memory-map" in caplog.text
    ids, mask = _ids_mask([20, 7], 24)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref(ids, mask),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_objects_are_refused_not_run(tmp_path, capsys, legacy):
    path = tmp_path / "evil.pth"
    torch.save({"token_embedding.weight": torch.zeros(2), "x": Payload()}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="other than tensors") as err:
        T.load_umt5_encoder(path, TINY)
    assert "\n" not in str(err.value) and "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_foreign_file_bytes_are_never_quoted(tmp_path, suffix):
    secret = b"root:x:0:0:root:/root:/bin/bash\nSECRET-TOKEN-1234\n"
    path = tmp_path / f"t5{suffix}"
    path.write_bytes(secret)
    with pytest.raises(CheckpointError) as err:
        T.load_umt5_encoder(path, TINY)
    msg = str(err.value)
    assert "\n" not in msg and "root" not in msg.replace(str(tmp_path), "") and "SECRET" not in msg, msg
    (value,) = struct.unpack("<Q", secret[:8])
    assert str(value) not in msg and "'r'" not in msg
