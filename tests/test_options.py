"""The shared CLI options (``runtime.options``): one definition in generate, serve and quality, and the refusals
that must come before a model loads (a 14B load takes minutes)."""
from __future__ import annotations

import pytest

from runtime.generate import build_parser as generate_parser, main as generate
from runtime.quality import main as quality
from runtime.serve.__main__ import build_parser as serve_parser, main as serve

SHARED = ("--ckpt_dir", "--device", "--backend", "--attention", "--precision", "--lora", "--offload_model", "--t5_cpu",
          "--engines_dir")


def flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_every_cli_has_the_shared_options():
    for parser in (generate_parser(), serve_parser()):
        assert set(SHARED) <= flags(parser)
    a = generate_parser().parse_args(["--offload_model"])
    b = generate_parser().parse_args(["--offload_model", "false"])
    c = serve_parser().parse_args(["--offload_model", "--data_dir", "x"])
    assert a.offload_model is True and b.offload_model is False and c.offload_model is True


@pytest.fixture
def no_loading(monkeypatch):
    import runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize("argv,want", [
    (["--precision", "fp8"], "needs an NVIDIA Hopper"),
    (["--backend", "torch-graph"], "needs a CUDA device"),
    (["--attention", "fa3"], "no CUDA device"),
    (["--attention", "fa3-fp8"], "no CUDA device"),
    (["--lora", "x.ckpt"], "pickle"),
])
def test_refused_before_loading_on_the_cpu(tmp_path, capsys, no_loading, argv, want):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusals are the CPU machine's")
    for run, extra in ((generate, ["--save_file", str(tmp_path / "o.mp4")]), (quality, []),
                       (serve, ["--data_dir", str(tmp_path / "d")])):
        assert run(argv + ["--device", "cpu"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0] and "head_dim" not in err[0], (run, err)


@pytest.mark.parametrize("kwargs,want", [
    (dict(backend="torch-graph"), "backend='torch-graph' replays CUDA graphs"),
    (dict(precision="fp8"), "needs an NVIDIA Hopper"),
    (dict(attention="fa3"), "attention='fa3' cannot run here: no CUDA device"),
])
def test_the_library_refuses_the_same_before_loading(monkeypatch, kwargs, want):
    import torch

    from runtime import S2VPipeline, tiny
    from runtime.errors import S2VError

    if torch.cuda.is_available():
        pytest.skip("the refusals are the CPU machine's")
    monkeypatch.setattr(tiny, "tiny_dit", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(S2VError, match=want):
        S2VPipeline.from_pretrained("tiny", device="cpu", **kwargs)
