"""Block offload (``runtime.offload``) and the GPU memory plan (``runtime.memory_plan``): the streamed pipeline gives
the resident video bit for bit, the copies are ordered as the design says (a recording timeline), LoRA and FP8
reach the host copy, and ``--offload`` / ``--max_gpu_memory`` choose, refuse and reach the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import S2VPipeline, memory_plan as mp, offload, tiny
from runtime.config import DiTConfig
from runtime.demo import demo_image, demo_speech
from runtime.errors import ConfigError
from runtime.offload import HostTimeline, OffloadSpec
from tests.conftest import step_inputs

GEN = dict(seed=1, sample_steps=1, infer_frames=16, progress=False)  # 1.5 s of audio: a first and a later clip


@pytest.fixture(scope="module")
def inputs():
    return demo_image(), demo_speech(1.5)


@pytest.fixture(scope="module")
def resident_frames(inputs):
    r = S2VPipeline.from_pretrained("tiny", device="cpu").generate(*inputs, **GEN)
    assert r.info["clips"] == 2 and r.info["offload"] == "none"
    return r.frames


@pytest.mark.parametrize("spec", ["blocks", pytest.param("blocks:2", marks=pytest.mark.slow)])
def test_offload_blocks_gives_the_resident_video_bit_for_bit(inputs, resident_frames, spec):
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu", offload=spec)
    streamer = pipe.streamer
    resident = OffloadSpec.parse(spec).resident
    assert streamer.streamed == list(range(resident, 4)) and pipe.dit.block_source is streamer
    ran = []  # the streamed blocks' own modules must never run: only the slots their weights were copied into
    for i, block in enumerate(pipe.dit.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(("block", i)))
    for s, slot in enumerate(streamer.slots):
        slot.register_forward_pre_hook(lambda m, a, s=s: ran.append(("slot", s)))
    r = pipe.generate(*inputs, **GEN)
    assert r.info["offload"] == spec
    assert np.array_equal(r.frames, resident_frames)
    assert {("block", i) for i in range(resident)} | {("slot", s) for s in range(streamer.num_slots)} == set(ran)


class RecordingTimeline(HostTimeline):
    """The CPU timeline (copies done at once), logging each request; events are tokens naming their block."""

    def __init__(self):
        self.log = []

    def copy(self, block, slot, dst, src, after):
        super().copy(block, slot, dst, src, after)
        self.log.append(("copy", block, slot, after))
        return ("ready", block)

    def wait(self, block, slot, ready):
        assert ready == ("ready", block), "the compute waits on another block's copy"
        self.log.append(("wait", block, slot))

    def done(self, block, slot):
        self.log.append(("done", block, slot))
        return ("done", block)


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (1, 1), (0, 2), (2, 2)])
def test_prefetch_order_slot_reuse_and_drop(resident, prefetch):
    model = tiny.tiny_dit()
    ref_model = tiny.tiny_dit()
    timeline = RecordingTimeline()
    streamer = offload.attach(model, torch.device("cpu"), OffloadSpec("blocks", resident, prefetch), timeline)
    assert streamer.num_slots == min(prefetch + 1, 4 - resident)
    modules = {id(b): ("block", i) for i, b in enumerate(model.blocks)}
    modules.update({id(s): ("slot", k) for k, s in enumerate(streamer.slots)})
    for m in [*model.blocks, *streamer.slots]:
        m.register_forward_pre_hook(lambda m, a: timeline.log.append(("compute",) + modules[id(m)]))
    x, t, cond = step_inputs(model, frames=2, lat_h=8, lat_w=8)
    forwards = 3
    for _ in range(forwards):
        out = model.step(x, t, *cond.as_tuple())
        assert torch.equal(out, ref_model.step(x, t, *cond.as_tuple()))

    log, streamed = timeline.log, list(range(resident, 4))
    computes = [k for k, e in enumerate(log) if e[0] == "compute"]
    assert len(computes) == 4 * forwards
    # every streamed block copied exactly once per forward, in order; resident blocks never
    assert [e[1] for e in log if e[0] == "copy"] == streamed * forwards
    last_done = {}  # slot -> the done token of its last user
    for k, event in enumerate(log):
        kind = event[0]
        if kind == "copy":
            _, block, slot, after = event
            assert after == last_done.get(slot), f"block {block} copied into slot {slot} before its last user finished"
            assert after is None or log.index(("done", after[1], slot)) < k
        elif kind == "done":
            last_done[event[2]] = ("done", event[1])
    block_of = []  # the block each compute ran, from the stream's order: resident blocks, then waits
    for k in computes:
        prev = log[k - 1]
        block_of.append(prev[1] if prev[0] == "wait" else log[k][2])
        if prev[0] == "wait":
            assert log[k][1:] == ("slot", prev[2])   # the slot it waited for is the one that runs
        else:
            assert log[k][1] == "block" and log[k][2] < resident
    assert block_of == list(range(4)) * forwards
    for f in range(forwards):  # the copy of block i+1 is issued before block i computes
        for i in streamed:
            if i == 0:
                continue
            copy_at = [k for k, e in enumerate(log) if e[:2] == ("copy", i)][f]
            assert copy_at < computes[4 * f + i - 1]


def test_a_pass_abandoned_midway_waits_for_its_copies_then_the_next_pass_runs():
    """An error in a block leaves copies in flight for blocks that will not run: the pass waits for them when it is
    dropped (before the caller can free the slots), once, and the next pass gives the resident output."""
    model, ref = tiny.tiny_dit(), tiny.tiny_dit()
    timeline = RecordingTimeline()
    drains = []
    timeline.drain = lambda: drains.append(len(timeline.log))
    streamer = offload.attach(model, torch.device("cpu"), OffloadSpec("blocks", 0), timeline)
    x, t, cond = step_inputs(model, frames=2, lat_h=8, lat_w=8)

    def fail(module, args):
        raise torch.cuda.OutOfMemoryError("out of memory in block 1")

    hook = streamer.slots[1].register_forward_pre_hook(fail)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.step(x, t, *cond.as_tuple())
    assert len(drains) == 1 and not streamer._open
    hook.remove()
    assert torch.equal(model.step(x, t, *cond.as_tuple()), ref.step(x, t, *cond.as_tuple()))
    assert len(drains) == 1  # a completed pass does not wait


def test_fp8_blocks_stay_fp8_on_the_host_and_copy_fewer_bytes():
    """The host-copy logic of FP8 offload on the CPU (quantised here without the GPU check; FP8 GEMMs need Hopper)."""
    from runtime.kernels.fp8 import QUANTISED, FP8Linear

    model = tiny.tiny_dit(torch.bfloat16)
    bf16_block = offload.tensor_bytes(model.blocks[0])
    quantised = [m for n, m in model.blocks[0].named_modules() if n in QUANTISED]
    # each quantised weight: 1 byte per element instead of 2, plus an fp32 scale per output channel
    want = bf16_block - sum(m.weight.numel() - 4 * m.weight.shape[0] for m in quantised)
    offload.quantize_on_host(model, torch.device("cpu"), check=False)
    streamer = offload.attach(model, torch.device("cpu"), OffloadSpec("blocks", 1), RecordingTimeline())
    host = model.blocks[1]
    assert isinstance(host.self_attn.qkv, FP8Linear) and host.self_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert host.ffn[0].weight_scale.dtype == torch.float32
    assert streamer.block_bytes == want < bf16_block
    sizes = mp.ModelSizes.from_configs(DiTConfig.tiny(), *_tiny_other_configs(), dtype=torch.bfloat16, precision="fp8")
    assert sizes.dit_block == streamer.block_bytes  # the memory model counts what is copied
    for _ in streamer.stream():  # one pass of copies: each slot holds a streamed block's e4m3 bytes
        pass
    slot = streamer.slots[(3 - 1) % streamer.num_slots]
    assert torch.equal(slot.ffn[2].weight.view(torch.uint8), model.blocks[3].ffn[2].weight.view(torch.uint8))


def test_pinned_arenas_pack_the_host_blocks_and_the_slots_copy_only_their_block():
    """The packing behind page-locked host blocks (on the CPU: ordinary arenas, the same views and copies). One
    ``pin_memory()`` per tensor would round each up to a power of two (~1.6x the 14B blocks' bytes)."""
    from runtime.kernels.fp8 import FP8Linear

    model = tiny.tiny_dit(torch.bfloat16)
    offload.quantize_on_host(model, torch.device("cpu"), check=False)  # FP8: buffers (weights, scales) beside params
    want = {i: [t.clone() for _, t in offload.block_tensors(b)] for i, b in enumerate(model.blocks)}
    arena = 64 * 1024
    arenas = offload.PinnedArenas(pin=False, arena_bytes=arena)
    for block in model.blocks:
        offload._pin(block, arenas)
    total = sum(offload.tensor_bytes(b) for b in model.blocks)
    assert arenas.arenas <= total // arena + 2  # packed: only each arena's tail is lost
    for i, block in enumerate(model.blocks):
        for (name, t), ref in zip(offload.block_tensors(block), want[i]):
            assert t.untyped_storage().nbytes() == arena, f"block {i} {name} is not in an arena"
            assert (t.storage_offset() * t.element_size()) % offload.PIN_ALIGN == 0 and t.is_contiguous()
            assert t.dtype == ref.dtype and torch.equal(t.view(torch.uint8), ref.view(torch.uint8))
    assert isinstance(model.blocks[1].ffn[0], FP8Linear)
    streamer = offload.BlockStreamer(model, torch.device("cpu"), OffloadSpec("blocks", 1), RecordingTimeline())
    for slot in streamer.slots:  # each slot holds its own block-sized tensors: no arena was copied with them
        for (name, t), (_, host) in zip(offload.block_tensors(slot), offload.block_tensors(model.blocks[1])):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
            assert t.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    for _ in streamer.stream():
        pass
    assert all(torch.equal(t.view(torch.uint8), r.view(torch.uint8))  # the copies left the host blocks unchanged
               for i in streamer.streamed for (_, t), r in zip(offload.block_tensors(model.blocks[i]), want[i]))
    huge = torch.arange(arena, dtype=torch.int32)  # larger than an arena: an allocation of its own
    placed = arenas.place(huge)
    assert torch.equal(placed, huge) and placed.untyped_storage().nbytes() == huge.numel() * 4


# --------------------------------------------------------------------------------------------- on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="block offload's side-stream copies from "
                                "pinned host memory and their CUDA events need a CUDA GPU")


class TimedCudaTimeline(offload.CudaTimeline):
    """The real CUDA timeline with timing events beside its own, and sleeps that make a missing wait visible: slow
    copies (a block that did not wait for its copy would read the slot's previous block) or slow compute (a copy
    that did not wait for the slot's last block would overwrite the weights that block is about to read)."""

    def __init__(self, device, copy_sleep: int, compute_sleep: int):
        super().__init__(device)
        self.copy_sleep, self.compute_sleep, self.log = copy_sleep, compute_sleep, []

    @staticmethod
    def _mark(stream):
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def copy(self, block, slot, dst, src, after):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(self.copy_sleep)
        # The real copy, its `ready` event made a timing one: the block's wait mark is then ordered after it by the
        # stream wait itself (a mark recorded after `ready` on the side stream could land either side of it).
        event = torch.cuda.Event
        torch.cuda.Event = lambda *a, **k: event(enable_timing=True)
        try:
            ready = super().copy(block, slot, dst, src, after)
        finally:
            torch.cuda.Event = event
        self.log.append(("copy", block, slot, after, ready))
        return ready

    def wait(self, block, slot, ready):
        super().wait(block, slot, ready)
        self.log.append(("wait", block, slot, self._mark(torch.cuda.current_stream(self.device))))
        torch.cuda._sleep(self.compute_sleep)

    def done(self, block, slot):
        event = super().done(block, slot)
        self.log.append(("done", block, slot, event, self._mark(torch.cuda.current_stream(self.device))))
        return event


SLOW, FAST = 20_000_000, 1_000  # GPU clock cycles: ~10 ms against a tiny block's microseconds


@needs_cuda
@pytest.mark.parametrize("resident,prefetch,slow", [(0, 1, "copies"), (0, 1, "compute"), (1, 2, "copies"),
                                                    (1, 2, "compute")])
def test_streamed_forwards_equal_resident_on_gpu_with_the_events_in_order(resident, prefetch, slow):
    """Forwards on a GPU (a CFG batch of 2, then 1, then 2: the first blocks of each pass and the boundaries
    between passes) give the resident output bit for bit from pinned host blocks, and the device timeline agrees:
    a copy into a slot ends after the compute that last read the slot, a block starts after its copy ended."""
    dev = torch.device("cuda")
    resident_model = tiny.tiny_dit(torch.bfloat16, dev)
    model = tiny.tiny_dit(torch.bfloat16)
    timeline = TimedCudaTimeline(dev, *((SLOW, FAST) if slow == "copies" else (FAST, SLOW)))
    streamer = offload.attach(model, dev, OffloadSpec("blocks", resident, prefetch), timeline)
    assert all(t.is_pinned() for i in streamer.streamed for t in streamer.host[i])
    assert all(t.is_cuda for s in streamer.slot_tensors for t in s)
    cases = [step_inputs(resident_model, frames=2, lat_h=8, lat_w=8, batch=b, seed=k) for k, b in enumerate((2, 1, 2))]
    for x, t, cond in cases:
        want = resident_model.step(x, t, *cond.as_tuple())
        assert torch.equal(model.step(x, t, *cond.as_tuple()), want)
    torch.cuda.synchronize()
    log = timeline.log
    dones = {id(e[3]): e[4] for e in log if e[0] == "done"}
    copies = [e for e in log if e[0] == "copy"]
    assert len(copies) == len(streamer.streamed) * len(cases)
    assert sum(after is not None for *_, after, _ in copies) == len(copies) - streamer.num_slots
    for _, block, slot, after, end in copies:
        if after is not None:
            # >= 0: the timer's resolution (~0.5 us) can give two ordered events the same stamp
            assert dones[id(after)].elapsed_time(end) >= 0, f"block {block} copied into slot {slot} too early"
    last_copy = {}
    for e in log:
        if e[0] == "copy":
            last_copy[e[1]] = e[4]
        elif e[0] == "wait":
            assert last_copy[e[1]].elapsed_time(e[3]) >= 0, f"block {e[1]} computed before its copy ended"


@needs_cuda
@pytest.mark.slow  # torch.compile of the tiny blocks: tens of seconds
def test_compiled_slots_equal_compiled_resident_on_gpu():
    """Compiled blocks over slots whose weights change under them (copied in place: the same addresses) give
    the compiled resident output, forward after forward."""
    dev = torch.device("cuda")
    resident_model = tiny.tiny_dit(torch.bfloat16, dev)
    model = tiny.tiny_dit(torch.bfloat16)
    streamer = offload.attach(model, dev, OffloadSpec("blocks", 1))
    addresses = [[t.data_ptr() for t in s] for s in streamer.slot_tensors]
    resident_model.compile_blocks()
    model.compile_blocks()
    for batch in (2, 1, 2):
        x, t, cond = step_inputs(resident_model, frames=2, lat_h=8, lat_w=8, batch=batch, seed=batch)
        assert torch.equal(model.step(x, t, *cond.as_tuple()), resident_model.step(x, t, *cond.as_tuple()))
    assert [[t.data_ptr() for t in s] for s in streamer.slot_tensors] == addresses


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="FP8 block linears run on Hopper or newer GPUs only (torch._scaled_mm)")
def test_fp8_offload_matches_resident_fp8_on_gpu():
    dev = torch.device("cuda")
    resident = tiny.tiny_dit(torch.bfloat16, dev)
    resident.set_precision("fp8")
    streamed = tiny.tiny_dit(torch.bfloat16)
    offload.quantize_on_host(streamed, dev)
    offload.attach(streamed, dev, OffloadSpec("blocks", 1))
    x, t, cond = step_inputs(resident, frames=2, lat_h=8, lat_w=8)
    assert torch.equal(streamed.step(x, t, *cond.as_tuple()), resident.step(x, t, *cond.as_tuple()))


def test_lora_is_merged_once_into_the_host_copy(tmp_path, monkeypatch):
    from benchmarks.clip import random_lora
    from runtime import lora

    path = random_lora(tiny.tiny_dit(), tmp_path / "l.safetensors", rank=2, device="cpu")
    calls = []
    real_merge, real_attach = lora.merge, offload.attach

    def merge(model, specs, **kw):
        calls.append(("merge", next(model.blocks[-1].parameters()).device.type, model.block_source is None))
        return real_merge(model, specs, **kw)

    monkeypatch.setattr(lora, "merge", merge)
    monkeypatch.setattr(offload, "attach", lambda *a, **k: calls.append(("attach",)) or real_attach(*a, **k))
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu", offload="blocks", loras=[(path, 0.7)])
    assert [c[0] for c in calls if c[0] == "merge"] == ["merge"] and calls[0] == ("merge", "cpu", True)
    assert [c[0] for c in calls] == ["merge", "attach"]  # merged before the host copy is pinned and streamed
    monkeypatch.setattr(lora, "merge", real_merge)
    ref = S2VPipeline.from_pretrained("tiny", device="cpu", loras=[(path, 0.7)])
    for got, want in zip(pipe.dit.blocks, ref.dit.blocks):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert not torch.equal(ref.dit.blocks[0].ffn[0].weight, tiny.tiny_dit().blocks[0].ffn[0].weight)


@pytest.mark.parametrize("value,want", [
    ("blocks:x", "must be a whole number"), ("disk", "expected none, blocks or blocks:N"), ("blocks:4", "keep 0 to 3"),
])
def test_bad_offload_values_are_refused_before_loading(monkeypatch, value, want):
    monkeypatch.setattr(tiny, "tiny_dit", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=want):
        S2VPipeline.from_pretrained("tiny", device="cpu", offload=value)


@pytest.mark.parametrize("kwargs,want", [
    (dict(backend="torch-graph"), "CUDA graphs capture the weights' addresses"),
    (dict(backend="onnxruntime"), "holds its own weights"),
    (dict(offload_model=True), "choose one"),
])
def test_offload_conflicts_are_refused_in_one_line(monkeypatch, kwargs, want):
    monkeypatch.setattr(tiny, "tiny_dit", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=want) as err:
        S2VPipeline.from_pretrained("tiny", device="cpu", offload="blocks", **kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- the memory plan
def _tiny_other_configs():
    from transformers import Wav2Vec2Config

    from runtime.models.text import WanT5Config
    from runtime.models.vae import VAEConfig

    t = tiny.TEXT_DIM
    text = WanT5Config(vocab=tiny.ByteTokenizer.vocab_size, dim=t, dim_attn=t, dim_ffn=2 * t, num_heads=4, num_layers=2)
    audio = Wav2Vec2Config(hidden_size=tiny.AUDIO_DIM, num_hidden_layers=DiTConfig.tiny().audio_layers - 1,
                           num_attention_heads=2, intermediate_size=2 * tiny.AUDIO_DIM, conv_dim=(32,) * 7,
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                           feat_extract_norm="layer", conv_bias=True, vocab_size=32)
    return VAEConfig.tiny(), text, audio


def test_weight_bytes_from_the_configs_match_the_built_models():
    counted = mp.ModelSizes.from_configs(DiTConfig.tiny(), *_tiny_other_configs(), dtype=torch.float32,
                                         text_dtype=torch.float32)
    built = mp.ModelSizes.tiny()
    assert counted == built


# The fitted activation model's choices at 704x1024, 80 frames, random 14B bf16, UMT5 on the CPU (--t5_cpu): the table
# in docs/memory.md (benchmarks/results/cpu/memory_plan_704x1024-80f.json). Refitting the constants moves it: update
# all three together.
ACT = mp.ActivationModel()
TABLE = [  # (GiB, DiT batch) -> (offload, VAE form), or None where refused
    (80, 2, ("blocks:39", "default")),  # all resident would keep the graphs' pool beside the VAE decode
    (80, 1, ("blocks:39", "default")),
    (48, 2, ("blocks:9", "default")),
    (32, 2, None),
    (24, 2, None),
    (48, 1, ("blocks:9", "default")),
    (32, 1, ("blocks:16", "low_memory")),
    (24, 1, ("blocks:4", "low_memory")),
]


@pytest.fixture(scope="module")
def sizes14b():
    return mp.ModelSizes.s2v_14b()


@pytest.mark.parametrize("cap,batch,want", TABLE)
def test_max_gpu_memory_picks_the_least_offloading_that_fits(sizes14b, cap, batch, want):
    shape = mp.Shape(704, 1024, 80, batch)
    options = mp.candidates(sizes14b, text_cpu=True)
    if want is None:
        with pytest.raises(ConfigError, match="batch_cfg=False: one CFG branch at a time fits"):
            mp.choose(sizes14b, shape, cap, text_cpu=True, act=ACT)
        assert not any(mp.fits(sizes14b, p, shape, cap * mp.GIB, ACT) for p in options)
        return
    place = mp.choose(sizes14b, shape, cap, text_cpu=True, act=ACT)
    assert (str(place.offload), place.vae, place.text, place.audio) == (*want, "cpu", "cpu")
    peaks = mp.stage_peaks(sizes14b, place, shape, ACT)
    assert max(peaks.values()) <= cap * mp.GIB
    for less in options[:options.index(place)]:  # everything less offloaded does not fit
        assert max(mp.stage_peaks(sizes14b, less, shape, ACT).values()) > cap * mp.GIB


def test_a_resident_dit_s_graph_pool_counts_only_for_the_graph_backend(sizes14b):
    from runtime.pipeline import plan_memory

    shape = mp.Shape(704, 1024, 80, 2)
    resident = mp.Placement(OffloadSpec(), "cpu", "cpu")
    a, b = mp.stage_peaks(sizes14b, resident, shape), mp.stage_peaks(sizes14b, resident, shape, graphs=False)
    assert a["denoise"] == b["denoise"] and all(a[k] - b[k] == a["denoise"] - mp.resident_bytes(sizes14b, resident)
                                                - ACT.reserve_bytes for k in a if k != "denoise")
    streamed = mp.Placement(OffloadSpec("blocks", 39), "cpu", "cpu")  # compiled without a graph: nothing kept
    assert mp.stage_peaks(sizes14b, streamed, shape) == mp.stage_peaks(sizes14b, streamed, shape, graphs=False)
    assert str(mp.choose(sizes14b, shape, 80, text_cpu=True).offload) == "blocks:39"
    assert not mp.choose(sizes14b, shape, 80, text_cpu=True, graphs=False).offload.enabled
    # the pipeline's plan asks about the backend a resident DiT would run (auto: torch-graph on a GPU)
    tiny_sizes = mp.ModelSizes.tiny(torch.bfloat16)
    tiny_shape = mp.Shape(64, 64, 80, 2)
    low, high = (max(mp.stage_peaks(tiny_sizes, mp.Placement(), tiny_shape, graphs=g).values()) / mp.GIB
                 for g in (False, True))
    assert low < high
    cuda = torch.device("cuda")  # a device object only: the plan reads configs
    cap = (low + high) / 2
    assert plan_memory("tiny", cuda, None, None, cap, "64*64", 80, 2, backend="torch-compile") == mp.Placement()
    assert plan_memory("tiny", cuda, None, None, cap, "64*64", 80, 2) != mp.Placement()  # something moves off


def test_the_low_memory_vae_comes_after_every_default_placement(sizes14b):
    options = mp.candidates(sizes14b)
    forms = [p.vae for p in options]
    assert forms == sorted(forms, key=mp.VAE_FORMS.index) and forms.count("low_memory") == len(options) // 2
    shape = mp.Shape(704, 1024, 80, 1)
    default, low = mp.Placement(OffloadSpec("blocks"), "cpu", "cpu"), mp.Placement(OffloadSpec("blocks"), "cpu", "cpu",
                                                                                   "low_memory")
    a, b = mp.stage_peaks(sizes14b, default, shape), mp.stage_peaks(sizes14b, low, shape)
    assert b["vae_decode"] < a["vae_decode"] and b["vae_encode"] < a["vae_encode"] and b["denoise"] == a["denoise"]
    # the default decode writes its 153 frames into one device tensor, the low-memory one to the host
    frames = 3 * 4 * 153 * 704 * 1024
    assert a["vae_decode"] - b["vae_decode"] == pytest.approx(
        704 * 1024 * 96 * (ACT.vae_decode_bytes_per_pixel_channel - ACT.vae_decode_low_memory_bytes_per_pixel_channel)
        + frames, abs=2)


def test_activation_constants_come_from_the_committed_results(sizes14b):
    """Each fitted constant recomputed from the result files its comment names (runtime.memory_plan)."""
    import json
    from pathlib import Path

    res = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    vae = {r["variant"]: r for r in json.loads((res / "nvidia-h200" / "vae_speed_later-704x1024.json").read_text())["rows"]}
    cpu = {r["form"]: r["scaled_gib"] for r in json.loads((res / "cpu" / "vae_live_bytes_704x1024.json").read_text())["rows"]}
    pipe = json.loads((res / "nvidia-h200" / "pipeline_fullsize.json").read_text())["rows"][1]
    px, gib = 704 * 1024, mp.GIB
    harness = (sizes14b.vae + 3 * 73 * px * 4 + 16 * 39 * 88 * 128 * 4 + 3 * 153 * px * 4) / gib  # + first row's frames
    frames = 3 * 153 * px * 4 / gib

    def per_px(gib_value):  # GiB at 704x1024 -> bytes per pixel and VAE base channel
        return gib_value * gib / (px * 96)

    dec_ratio = (vae["baseline"]["decode_peak_gib"] - harness) / cpu["decode"]
    enc_ratio = (vae["baseline"]["encode_peak_gib"] - harness) / cpu["encode"]
    dec = (vae["compiled"]["decode_peak_gib"] - harness - frames) * cpu["decode_chunk2"] / cpu["decode"]
    enc = (vae["compiled"]["encode_peak_gib"] - harness - frames) * cpu["encode_chunk2"] / cpu["encode"]
    for got, want in ((ACT.vae_decode_bytes_per_pixel_channel, per_px(dec)),
                      (ACT.vae_decode_low_memory_bytes_per_pixel_channel, per_px(cpu["decode_low_memory"] * dec_ratio)),
                      (ACT.vae_encode_bytes_per_pixel_channel, per_px(enc)),
                      (ACT.vae_encode_low_memory_bytes_per_pixel_channel, per_px(cpu["encode_low_memory"] * enc_ratio))):
        assert want <= got <= want + 1  # rounded up: a plan may waste a byte per pixel, never come short
    weights = sizes14b.dit_other + 40 * sizes14b.dit_block + sizes14b.vae + sizes14b.text + sizes14b.audio
    per_token = (pipe["peak_mem_gib"] * gib - weights) / (2 * 59136)  # first clip, CFG batch 2
    fitted = sizes14b.dim * ACT.dit_bytes_per_token_dim + sizes14b.ffn_dim * ACT.dit_bytes_per_token_ffn
    assert per_token <= fitted <= per_token * 1.001


def test_low_memory_vae_constants_match_live_bytes_measured_on_the_cpu():
    """The tiny-width VAE (base 16) on the CPU: every activation is a multiple of the base width, so its live bytes
    per pixel and base channel are the real VAE's (within the few small tensors that are not); the low-memory forms
    need much less than the default ones, as the fitted constants say."""
    from benchmarks.offload import vae_live_peaks

    live = {k: v / (32 * 48 * 16) for k, v in vae_live_peaks(16, 32, 48, 3).items()}
    assert live["decode_low_memory"] < 0.7 * live["decode"] and live["encode_low_memory"] < 0.85 * live["encode"]
    assert live["decode_chunk2"] > 1.2 * live["decode"]  # two latents a step: more activations at once
    gpu_over_cpu = ACT.vae_decode_low_memory_bytes_per_pixel_channel / live["decode_low_memory"]
    assert 1.1 < gpu_over_cpu < 1.2  # the H200's eager decode over its CPU live bytes: 1.145
    assert ACT.vae_encode_low_memory_bytes_per_pixel_channel / live["encode_low_memory"] == pytest.approx(1.23, rel=0.03)


def test_the_resident_weights_are_counted_by_hand(sizes14b):
    s = sizes14b
    place = mp.Placement(OffloadSpec("blocks", 9), "cpu", "cpu")
    assert mp.resident_bytes(s, place) == s.dit_other + (9 + 2) * s.dit_block + s.vae
    assert mp.resident_bytes(s, mp.Placement()) == s.dit_other + 40 * s.dit_block + s.vae + s.text + s.audio
    assert 32.6e9 < s.dit_other + 40 * s.dit_block < 33.5e9  # 16.3B parameters, bf16 but for the fp32 islands
    assert mp.dit_tokens(s, mp.Shape(704, 1024, 80)) == 63360      # the later clip's tokens (docs/speed.md)


def test_refusal_names_the_largest_size_that_fits(sizes14b):
    shape = mp.Shape(704, 1024, 80, 2)
    with pytest.raises(ConfigError) as err:
        mp.choose(sizes14b, shape, 24, act=ACT, name="--max_gpu_memory", size_name="--size")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--max_gpu_memory 24 GiB cannot fit --size 704*1024, 80 frames")
    h, w = (int(v) for v in msg.split("largest size that fits is --size ")[1].split(":")[0].split("*"))
    most = mp.candidates(sizes14b)[-1]
    assert most.vae == "low_memory" and str(most.offload) == "blocks" and most.text == most.audio == "cpu"
    assert mp.fits(sizes14b, most, shape.with_size(h, w), 24 * mp.GIB, ACT)
    assert (h, w) == (512, 768)  # the next size of the search (576x832 at this aspect) does not fit
    assert not mp.fits(sizes14b, most, shape.with_size(576, 832), 24 * mp.GIB, ACT)
    assert "(or --no_batch_cfg: one CFG branch at a time fits)" in msg
    with pytest.raises(ConfigError, match=r"^max_gpu_memory 24 GiB cannot fit size='704\*1024'.* size='512\*768'"):
        mp.choose(sizes14b, shape, 24, act=ACT)  # the library's words


# ------------------------------------------------------------------------------------------- the flags
def test_cli_flags_parse_and_reach_the_pipeline(tmp_path, monkeypatch, capsys):
    import runtime.pipeline as pipeline
    from runtime.generate import build_parser, main

    seen = {}

    def fake(cls, path, **kwargs):
        seen.update(kwargs, path=path)
        raise ConfigError("stop here")

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", classmethod(fake))
    out = ["--device", "cpu", "--save_file", str(tmp_path / "o.mp4")]
    assert main(["--offload", "blocks:2"] + out) == 2
    assert seen["offload"] == "blocks:2" and "max_gpu_memory" not in seen
    args = build_parser().parse_args(["--max_gpu_memory", "1.5", "--size", "128*128", "--sample_guide_scale", "1"])
    assert args.max_gpu_memory == 1.5
    seen.clear()
    assert main(["--max_gpu_memory", "1.5", "--size", "128*128", "--sample_guide_scale", "1"] + out) == 2
    assert seen["max_gpu_memory"] == 1.5 and seen["fit_size"] == "128*128" and seen["fit_batch"] == 1
    assert "stop here" in capsys.readouterr().err


@pytest.mark.parametrize("argv,want", [
    (["--offload", "blocks:x"], "--offload 'blocks:x': N in blocks:N must be a whole number"),
    (["--offload", "blocks", "--offload_model"], "--offload blocks streams the DiT's blocks from host memory"),
    (["--max_gpu_memory", "0.5"], "--max_gpu_memory 0.5 GiB cannot fit --size 64*64"),
    (["--max_gpu_memory", "-1"], "--max_gpu_memory -1.0: give the GPU memory to fit in GiB"),
    (["--max_gpu_memory", "8", "--offload", "blocks"], "--max_gpu_memory chooses the offloading itself"),
])
def test_cli_refusals_come_in_one_line_before_loading(tmp_path, monkeypatch, capsys, argv, want):
    import runtime.pipeline as pipeline
    from runtime.generate import main

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(argv + ["--device", "cpu", "--save_file", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_max_gpu_memory_places_the_tiny_pipeline():
    """A budget that only full offload fits streams every block (the video is the resident one: tested above)."""
    sizes = mp.ModelSizes.tiny()
    shape = mp.Shape(64, 64, 80, 2)
    cap = max(mp.stage_peaks(sizes, mp.Placement(OffloadSpec("blocks", 0), "cpu", "cpu"), shape).values()) / mp.GIB
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu", max_gpu_memory=cap, t5_cpu=True)
    assert str(pipe.offload) == "blocks" and not pipe.move_text and pipe.audio_encoder.device.type == "cpu"
    assert str(mp.choose(sizes, shape, cap * 1.5, text_cpu=True).offload) == "none"


@pytest.mark.slow  # two tiny pipelines and their clips: ~10 s alone, more on a shared machine
def test_offload_benchmark_dry_run_on_the_tiny_model(tmp_path):
    import json

    from benchmarks.offload import main as bench

    assert bench(["--tiny", "--caps", "24", "--recipes", "official", "--official-steps", "1",
                  "--offload-specs", "blocks:1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "offload_64x96-16f.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["command"].startswith("python -m benchmarks.offload")
    resident, capped = data["rows"]
    for row in (resident, capped):
        assert {"offload", "memory_cap_gib", "peak_gib", "steps", "precision", "clip", "clip_s"} <= set(row)
        assert row["steps"] == 1 and row["clip"] == "later" and row["clip_s"] > 0
        assert row["vae_encode_s"] > 0 and row["denoise_s"] > 0  # the motion encode is timed apart from the steps
    assert (resident["offload"], resident["memory_cap_gib"]) == ("none", None)
    assert (capped["offload"], capped["memory_cap_gib"]) == ("blocks:1", 24.0) and capped["slowdown"] > 0
    assert (tmp_path / "offload_64x96-16f.md").is_file()


def test_offload_benchmark_runs_the_headline_rows_first_and_follows_the_plan_s_advice():
    from types import SimpleNamespace

    from benchmarks.offload import _plan, row_order

    order = row_order(["bf16", "fp8"], ["few-step", "official"], [24.0, 32.0, 48.0], None)
    assert order[:4] == [("bf16", "few-step", None, "none"), ("bf16", "few-step", 24.0, None),
                         ("bf16", "official", None, "none"), ("bf16", "official", 24.0, None)]
    assert len(order) == 16 and {o[0] for o in order[8:]} == {"fp8"} and order[4][2] == 32.0
    assert row_order(["bf16"], ["few-step"], [24.0, 48.0], ["blocks:1", "blocks"])[1:] == [
        ("bf16", "few-step", 24.0, "blocks:1"), ("bf16", "few-step", 48.0, "blocks")]
    full = SimpleNamespace(tiny=False)
    # CFG's batch of 2 cannot fit 24 GiB: its branches run one after the other, with the plan's VAE form
    place, batched, note = _plan(full, "bf16", 24.0, (704, 1024, 80), 2)
    assert not batched and note.startswith("batch 2 refused") and place.vae == "low_memory"
    assert place == mp.choose(mp.ModelSizes.s2v_14b(), mp.Shape(704, 1024, 80, 1), 24.0, text_cpu=True)
    place, batched, _ = _plan(full, "bf16", 48.0, (704, 1024, 80), 2)
    assert batched and place == mp.choose(mp.ModelSizes.s2v_14b(), mp.Shape(704, 1024, 80, 2), 48.0, text_cpu=True)
    place, batched, note = _plan(full, "bf16", 8.0, (704, 1024, 80), 2)  # nothing fits: the most offloaded
    assert note.startswith("refused") and place == mp.candidates(mp.ModelSizes.s2v_14b(), text_cpu=True)[-1]


# ------------------------------------------------------------------------------------------- the low-memory VAE
def test_low_memory_vae_gives_the_default_frames_bit_for_bit():
    """Same arithmetic as the default chunked form at one latent per step (CPU: no compiled step, no channels-last):
    the same frames and latents, bit for bit; the frames come back on the host, the caches are consumed."""
    vae = tiny.tiny_vae()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 4, 6, 8, generator=g)
    video = torch.rand(1, 3, 13, 48, 64, generator=g) * 2 - 1
    ref_frames, ref_latents = vae.decode_chunked(z), vae.encode_chunked(video)
    low = vae.decode_low_memory(z)
    assert low.device.type == "cpu" and torch.equal(low, ref_frames)
    assert torch.equal(vae.encode_low_memory(video), ref_latents)
    vae.low_memory = True  # what the pipeline sets: the sampler's chunked calls take the low-memory path
    assert torch.equal(vae.decode_chunked(z), ref_frames) and torch.equal(vae.encode_chunked(video), ref_latents)
    vae.low_memory, vae.chunk_latents = False, 2  # the GPU form's two latents per step: exact in real arithmetic
    torch.testing.assert_close(vae.decode_chunked(z), ref_frames, rtol=0, atol=1e-5)
    caches = list(vae.decode_first(z[:, :, :1])[1])
    n = len(caches)
    vae._decode_consuming(z[:, :, 1:2], caches)
    assert caches == [None] * n  # every old cache dropped once its layer read it


def test_the_plan_s_low_memory_vae_reaches_the_pipeline():
    sizes = mp.ModelSizes.tiny()
    shape = mp.Shape(64, 64, 80, 2)
    low = mp.Placement(OffloadSpec("blocks", 0), "cpu", "cpu", "low_memory")
    cap = max(mp.stage_peaks(sizes, low, shape).values()) / mp.GIB
    assert mp.choose(sizes, shape, cap, text_cpu=True) == low
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu", max_gpu_memory=cap, t5_cpu=True)
    assert pipe.vae.low_memory and str(pipe.offload) == "blocks"
    assert not S2VPipeline.from_pretrained("tiny", device="cpu").vae.low_memory


@needs_cuda
def test_offloaded_low_memory_pipeline_runs_two_clips_on_gpu():
    """On a GPU the low-memory VAE's frames come back on the host while the motion history stays on the device:
    a second clip (which re-encodes that history) runs, and the video is the resident pipeline's, bit for bit
    (eager blocks: the same kernels on the same bits)."""
    kw = dict(seed=2, sample_steps=2, infer_frames=16, progress=False)
    streamed = S2VPipeline.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16, backend="torch",
                                           offload="blocks:1")
    resident = S2VPipeline.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16, backend="torch")
    streamed.vae.low_memory = resident.vae.low_memory = True  # as vae_low_memory=True sets it (eager VAE either way)
    a = streamed.generate(demo_image(), demo_speech(1.5), **kw)
    b = resident.generate(demo_image(), demo_speech(1.5), **kw)
    assert a.info["clips"] == 2 and np.array_equal(a.frames, b.frames)


def test_fuse_qkv_and_set_precision_after_attach_are_refused():
    dit = tiny.tiny_dit(torch.float32)
    for block in dit.blocks:  # as loaded before fusing (a checkpoint's separate q/k/v)
        block.self_attn.qkv = None
    offload.attach(dit, torch.device("cpu"), OffloadSpec("blocks"))
    with pytest.raises(ConfigError, match=r"fuse_qkv\(\) after block offload is attached"):
        dit.fuse_qkv()
    with pytest.raises(ConfigError, match=r"set_precision\('fp8'\) after block offload is attached"):
        dit.set_precision("fp8")
    dit.set_precision("native")  # no change: nothing to refuse
