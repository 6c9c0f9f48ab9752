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


# One setting refused by the CLI, the library and the service: (flag, value), (keyword, value), (field, text), and
# what follows the caller's own name for the value in all three messages.
SAME_REFUSAL = [
    (("--sample_steps", "0"), ("sample_steps", 0), ("sample_steps", "0"), ": must be an integer in [1, "),
    (("--sample_shift", "0"), ("sample_shift", 0.0), ("sample_shift", "0"), ": must be a positive finite number"),
    (("--sample_guide_scale", "inf"), ("guide_scale", float("inf")), ("guide_scale", "1e999"),
     ": must be a finite number (official default 4.5"),
    (("--base_seed", str(2**64)), ("seed", 2**64), ("seed", str(2**64)), ": must be in [0, 2**63 - 1]"),
    (("--infer_frames", "6"), ("infer_frames", 6), ("infer_frames", "6"), ": must be a positive multiple of 4"),
    (("--num_clip", "0"), ("num_clip", 0), ("num_clip", "0"), ": must be a positive integer"),
    (("--size", "16*16"), ("size", "16*16"), ("size", "16*16"), " gives an area of 256 px, below the minimum"),
    (None, ("sample_solver", "heun"), ("sample_solver", "heun"), ": unknown sample solver; choose one of: unipc,"),
]


@pytest.mark.parametrize("cli,lib,field,tail", SAME_REFUSAL, ids=[c[1][0] for c in SAME_REFUSAL])
def test_the_cli_library_and_service_refuse_a_setting_alike(pipe, monkeypatch, cli, lib, field, tail):
    """runtime.checks is the one definition: each caller's message names the value its own way (``--flag value``,
    ``keyword=value``, the form field as param) and then says the same."""
    from runtime.checks import said
    from runtime.demo import demo_image, demo_speech
    from runtime.errors import InputError
    from runtime.generate import validate
    from runtime.serve.uploads import Limits, RequestError, parse_fields

    if cli is not None:  # the CLI's solver choices are argparse's
        args = generate_parser().parse_args(list(cli))
        with pytest.raises(InputError) as err:
            validate(args)
        value = int(cli[1]) if cli[0] in ("--sample_steps", "--base_seed", "--infer_frames", "--num_clip") else \
            cli[1] if cli[0] == "--size" else float(cli[1])
        assert str(err.value).startswith(said(cli[0][2:], value, flag=True) + tail), str(err.value)

    monkeypatch.setattr(pipe, "encode_audio", lambda *a: pytest.fail("work started before the arguments were checked"))
    with pytest.raises(InputError) as err:
        pipe.generate(demo_image(), demo_speech(0.5), **{lib[0]: lib[1]})
    assert str(err.value).startswith(said(*lib) + tail), str(err.value)

    with pytest.raises(RequestError) as err:
        parse_fields({field[0]: field[1]}, Limits(), "64*64")
    value = float(field[1]) if lib[0] in ("sample_shift", "guide_scale") else \
        field[1] if lib[0] in ("size", "sample_solver") else int(field[1])
    assert err.value.param == field[0] and err.value.status == 400
    assert err.value.message.startswith(said(field[0], value) + tail), err.value.message
