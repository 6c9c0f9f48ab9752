"""benchmarks.serve_overhead: the checkpoint folder it writes loads through the runtime's own loaders, its
tokenizer is one ``AutoTokenizer`` accepts, the ``--model`` spec it gives the server is the CLI's recipe, and the
whole script runs on the CPU (``--tiny``: real server and CLI processes, the same request both ways)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import serve_overhead as so
from runtime import checkpoint as ck


def test_the_tokenizer_loads_and_gives_a_token_per_word(tmp_path):
    from runtime.models.text import load_tokenizer, resolve_negative_prompt, tokenize

    folder = so.write_tokenizer(tmp_path / ck.T5_TOKENIZER, so.tokenizer_texts())
    tok = load_tokenizer(folder)   # the runtime's loader: local files only, no remote code
    ids, mask = tokenize(tok, [so.PROMPT, "unheard words"], text_len=64)
    words = len(so.PROMPT.split())
    assert mask[0].sum() == words + 1 and ids[0, words] == 1 and ids[0, words + 1] == 0   # EOS, then padding
    assert ids[1, :3].tolist() == [2, 2, 1]                                                  # unknown words: <unk>
    assert int(ids.max()) < 259          # fits any UMT5 vocabulary, the tiny test encoder's too
    _, neg = tokenize(tok, [resolve_negative_prompt("")], text_len=512)   # the S2V default: a token per CJK character
    assert 60 < neg.sum() < 512 and tok.unk_token_id not in ids[0]


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model's small ops only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from runtime.models.text import WanT5Config

    folder = tmp_path_factory.mktemp("ckpt")
    t5 = WanT5Config(vocab=259, dim=48, dim_attn=48, dim_ffn=96, num_heads=4, num_layers=2)   # the tiny DiT's text_dim
    dit = so.write_checkpoint(folder, tiny=True, t5_config=t5)
    return folder, dit, t5


def test_the_checkpoint_folder_loads_through_the_pipeline(tiny_folder, tmp_path, monkeypatch, one_thread):
    from benchmarks.clip import random_lora
    from runtime.models.text import TextEncoder
    from runtime.pipeline import S2VPipeline

    folder, dit, t5 = tiny_folder
    assert (folder / ck.DIT_INDEX).is_file() and len(list(folder.glob("diffusion_pytorch_model-*"))) == 1
    ck.check_folder(folder)
    # The folder loader always builds UMT5-XXL; the tiny folder's encoder is smaller (the only difference).
    load = TextEncoder.from_checkpoint.__func__
    monkeypatch.setattr(TextEncoder, "from_checkpoint",
                        classmethod(lambda cls, d, device=None, dtype=torch.bfloat16: load(cls, d, device, dtype,
                                                                                           config=t5)))
    lora = random_lora(dit, tmp_path / "lora.safetensors", 4, "cpu")
    pipe = S2VPipeline.from_pretrained(str(folder), device="cpu")
    written = dit.state_dict()
    loaded = pipe.dit.state_dict()
    assert written.keys() == loaded.keys() and all(torch.equal(written[k], loaded[k]) for k in written)
    assert pipe.vae.encoder.conv1.weight.shape[0] == 16 and pipe.audio_encoder.model.config.hidden_size == 32
    image, audio = so.inputs(so.TINY)
    res = pipe.generate(image, audio, prompt=so.PROMPT, size=so.TINY.size, infer_frames=so.TINY.infer_frames,
                        sample_steps=1, progress=False)
    assert res.info["clips"] == 2 and res.frames.shape[0] == 16
    merged = S2VPipeline.from_pretrained(str(folder), device="cpu", loras=[(lora, 1.0)])  # the LoRA fits the DiT
    assert not torch.equal(merged.dit.blocks[0].ffn[0].weight, pipe.dit.blocks[0].ffn[0].weight)


def test_the_fast_models_spec_is_the_clis_recipe(tmp_path):
    from benchmarks.clip import random_lora
    from runtime import tiny
    from runtime.serve.models import ModelSpec, parse_model

    lora = random_lora(tiny.tiny_dit(), tmp_path / so.LORA_NAME, 4, "cpu")
    exact, fast = so.variants(3, lora)
    spec = parse_model(fast.model_flag(), ModelSpec("base"), max_steps=100)
    assert (spec.name, spec.sample_steps, spec.guide_scale, spec.sample_shift) == ("fast", 4, 1.0, 8.0)
    assert [(s.path, s.strength) for s in spec.loras] == [(lora, 1.0)]
    assert fast.cli_flags() == ["--sample_steps", "4", "--sample_guide_scale", "1", "--sample_shift", "8",
                                "--lora", f"{lora}:1.0"]
    assert str(tmp_path) not in fast.shown() and exact.job_fields(so.TINY)["sample_steps"] == "3"
    assert "sample_steps" not in fast.job_fields(so.TINY)   # the fast job takes its model's recipe
    job = {"sample_steps": 4, "guide_scale": 1, "sample_shift": 8, "seed": so.SEED}
    so.check_recipe(job, fast)
    with pytest.raises(RuntimeError, match="not the same request"):
        so.check_recipe({**job, "sample_shift": 5}, fast)


def test_prepare_writes_the_lora_once_and_primes(tmp_path, one_thread):
    status = tmp_path / "prepare.json"
    with torch.enable_grad():   # _prepare turns autograd off for its (normally spawned) process: keep ours as it was
        so._prepare(str(tmp_path), True, 4, [{"guide_scale": 4.5, "sample_shift": 3.0}], so.TINY, str(status))
        first = json.loads(status.read_text())
        lora = (tmp_path / so.LORA_NAME).read_bytes()
        so._prepare(str(tmp_path), True, 4, [], so.TINY, str(status))
        again = json.loads(status.read_text())
    assert first["device"].startswith("CPU") and first["write_s"] >= 0 and first["prime_s"] > 0
    assert "write_s" not in again and "prime_s" not in again            # reused, and nothing to prime
    assert (tmp_path / so.LORA_NAME).read_bytes() == lora


@pytest.mark.slow
def test_tiny_dry_run_times_both_paths_on_the_same_request(tmp_path):
    out = tmp_path / "out"
    assert so.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    data = json.loads((out / f"serve_overhead_{so.TINY.scenario}.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert (out / f"serve_overhead_{so.TINY.scenario}.md").is_file()
    for key in ("device", "date", "command", "shapes", "steps", "layout", "comparison", "tokenizer"):
        assert meta[key], key
    assert "git" in meta  # empty outside a git checkout (an archive of the tree)
    assert meta["steps"] == {"exact": 2, "fast": 4} and meta["layout"] == "sequential"
    by = {(r["variant"], r["path"], r["run"]): r for r in rows}
    assert len(by) == len(rows) == 8       # per variant: service first, second; CLI; overhead
    for v in ("exact", "fast"):
        for run in ("first", "second"):
            r = by[(v, "service", run)]
            assert 0 <= r["queue_s"] < r["job_s"] and r["run_s"] <= r["job_s"] <= r["client_s"]
            assert r["worker_s"] > 0 and r["load_s"] > 0
        cli = by[(v, "cli", "first")]
        assert cli["clips"] == 2 and cli["frames"] == 16 and 0 < cli["job_s"] < cli["process_s"]
        o = by[(v, "overhead", "first")]
        assert o["cli_s"] == cli["job_s"] and o["job_s"] == by[(v, "service", "first")]["job_s"]
        assert math.isfinite(o["overhead_pct"]) and isinstance(o["met"], bool)
        assert o["video_max_diff"] == 0   # the service and the CLI made the same video: the same request
