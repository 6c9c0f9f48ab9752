"""``python -m runtime.generate``: the official ``generate.py --task s2v-14B`` command line, faster.

Flag names and defaults follow the official script; ``--ckpt_dir tiny`` (the default) runs a built-in toy
model with inputs the project makes itself, so the whole pipeline can be tried anywhere.

The module imports only light, torch-free modules at its top: ``main`` installs the signal handlers first, and
the imports that load torch, PyAV or the models (the pipeline, media, parallel, scheduler, cache, TTS; ctypes for
the host-memory policy) are made inside the functions that need them, so a SIGTERM while they load still ends in
"terminated" and exit code 143.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from runtime.checks import (check_guide_scale, check_infer_frames, check_mp4_name, check_num_clip, check_sample_shift,
                            check_sample_steps, check_seed, check_size)
from runtime.config import RUN, SOLVERS
from runtime.errors import InputError, OutputError, S2VError
from runtime.options import (add_cache_args, add_pipeline_args, check_cache_args, check_pipeline_args,  # noqa: F401
                             pipeline_kwargs, str2bool)

EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGHUP = 130, 143, 129
# How long a signal may wait for the main thread (busy in a native op: a DiT forward, a VAE decode, a checkpoint
# read) before the process exits by itself.
SIGNAL_GRACE_S = 2.0
# Pseudo-filesystems where an output file can never be written (and where probing could have side effects).
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.generate",
                                description="Wan2.2-S2V-14B speech-to-video (official flags) on this engine.")
    add_pipeline_args(p)  # --ckpt_dir --device --backend --attention --precision --lora --offload_model --offload
    #                       --max_gpu_memory --t5_cpu --engines_dir
    p.add_argument("--task", default="s2v-14B", help="only s2v-14B is supported")
    p.add_argument("--size", default=None, help="area as H*W, e.g. 1024*704 (default 1280*720; 64*64 for the tiny "
                   "model); only the area counts: the orientation and aspect follow the reference image")
    p.add_argument("--frame_num", type=int, default=None, help="ignored by s2v (use --infer_frames), kept for compatibility")
    p.add_argument("--ulysses_size", type=int, default=1,
                   help="Ulysses sequence parallelism over this many ranks of each CFG branch (launch with torchrun; "
                        "must divide the 40 heads: 1, 2, 4, 5, 8, 10)")
    p.add_argument("--cfg_parallel", action="store_true", default=False,
                   help="run the conditional and unconditional DiT calls of each step on different ranks "
                        "(torchrun --nproc_per_node 2×ulysses_size); needs CFG (--sample_guide_scale > 1)")
    p.add_argument("--t5_fsdp", action="store_true", default=False,
                   help="accepted; UMT5 is replicated (11 GB in bf16: sharding it saves little and adds all-gathers)")
    p.add_argument("--dit_fsdp", action="store_true", default=False,
                   help="accepted; the DiT is replicated on every rank (33 GB in bf16 fits one GPU: FSDP would add "
                        "an all-gather of every block in every step and pays only when the weights do not fit)")
    p.add_argument("--convert_model_dtype", action="store_true", default=False,
                   help="accepted for compatibility: the DiT is always held in its compute dtype")
    p.add_argument("--save_file", default=None, help="output .mp4 (default: official naming in the current folder)")
    p.add_argument("--prompt", default=None, help="text prompt (default: the official S2V example prompt)")
    p.add_argument("--use_prompt_extend", action="store_true", default=False, help="not supported (needs online models)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed; -1 picks one at random and prints it")
    p.add_argument("--image", default=None, help="reference image (default for --ckpt_dir tiny: a generated face)")
    p.add_argument("--sample_solver", default=RUN.solver, choices=SOLVERS,
                   help=f"{RUN.solver} (official default), dpm++, or euler: flow-Euler on the shifted sigma grid at "
                        "--denoising_steps (LightX2V's few-step distill schedule)")
    p.add_argument("--denoising_steps", default=None, metavar="T1,T2,...",
                   help="the euler solver's timesteps, e.g. 1000,750,500,250 (default: --sample_steps evenly spaced "
                        "from 1000); sets --sample_steps to their count")
    p.add_argument("--sample_steps", type=int, default=None, help=f"denoising steps (default {RUN.sample_steps})")
    p.add_argument("--sample_shift", type=float, default=None, help=f"flow shift (default {RUN.sample_shift:g})")
    p.add_argument("--sample_guide_scale", type=float, default=None, help=f"CFG scale (default {RUN.guide_scale:g})")
    p.add_argument("--num_clip", type=int, default=None, help="number of clips (default: follow the audio length)")
    p.add_argument("--audio", default=None, help="driving audio: wav/mp3/m4a/flac/ogg or a video with an audio track")
    p.add_argument("--enable_tts", action="store_true", default=False, help="synthesize the audio from --tts_text")
    p.add_argument("--tts_prompt_audio", default=None, help="voice prompt for CosyVoice")
    p.add_argument("--tts_prompt_text", default=None, help="transcript of --tts_prompt_audio (CosyVoice zero-shot)")
    p.add_argument("--tts_text", default=None, help="text to speak with --enable_tts")
    p.add_argument("--max_audio_s", type=float, default=600.0,
                   help="refuse driving audio longer than this many seconds (default 600), checked before decoding")
    p.add_argument("--pose_video", default=None, help="DW-pose video driving the body")
    p.add_argument("--start_from_ref", action="store_true", default=False, help="start the video from the reference image")
    p.add_argument("--infer_frames", type=int, default=80, help="frames per clip, a multiple of 4 (48 or 80)")
    # this project
    add_cache_args(p)
    p.add_argument("--no_batch_cfg", action="store_true", default=False,
                   help="run cond and uncond as two DiT calls per step, as the official (default: one batch-2 call; same math)")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace --save_file if it exists")
    p.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    return p


EXAMPLE_PROMPT = ("Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred "
                  "feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the "
                  "background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white "
                  "clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. "
                  "A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside.")


def validate(args) -> None:
    """Every flag, before anything is loaded: a typo must not cost a model load."""
    if args.task != "s2v-14B":
        raise InputError(f"--task {args.task}: this engine runs only s2v-14B")
    if args.ulysses_size < 1:
        raise InputError(f"--ulysses_size {args.ulysses_size}: must be ≥ 1")
    if args.use_prompt_extend:
        raise InputError("--use_prompt_extend needs online prompt-extension models; write the prompt out instead")
    check_infer_frames(args.infer_frames, "infer_frames", flag=True)
    if args.num_clip is not None:
        check_num_clip(args.num_clip, "num_clip", flag=True)
    if args.denoising_steps is not None:
        from runtime.scheduler import SolverConfig, parse_denoising_steps

        args.denoising_steps = parse_denoising_steps(args.denoising_steps)
        if args.sample_solver != "euler":
            raise InputError("--denoising_steps sets the timesteps of --sample_solver euler; add --sample_solver euler")
        if args.sample_steps is None:
            args.sample_steps = len(args.denoising_steps)
        SolverConfig("euler", args.sample_steps, args.sample_shift if args.sample_shift is not None else RUN.sample_shift,
                     denoising_steps=args.denoising_steps)
    if args.sample_steps is not None:
        check_sample_steps(args.sample_steps, "sample_steps", flag=True)
    if args.sample_shift is not None:
        check_sample_shift(args.sample_shift, "sample_shift", flag=True)
    if args.sample_guide_scale is not None:
        check_guide_scale(args.sample_guide_scale, "sample_guide_scale", flag=True)
    if args.cfg_parallel and args.sample_guide_scale is not None and args.sample_guide_scale <= 1:
        raise InputError(f"--cfg_parallel with --sample_guide_scale {args.sample_guide_scale:g}: CFG is off, so there is "
                         "no unconditional branch to run on a second rank; drop --cfg_parallel and spread the one "
                         "branch with --ulysses_size N instead")
    if args.base_seed != -1:
        check_seed(args.base_seed, "base_seed", flag=True)
    if args.size is not None:
        check_size(args.size, "size", flag=True)
    if not (0 < args.max_audio_s < float("inf")):
        raise InputError(f"--max_audio_s {args.max_audio_s}: must be a positive number of seconds")
    if args.enable_tts and not args.tts_text:
        raise InputError("--enable_tts needs --tts_text (the words to speak)")
    if args.enable_tts and args.tts_prompt_text is not None and args.tts_prompt_audio is None:
        raise InputError("--tts_prompt_text needs --tts_prompt_audio (the recording it transcribes)")
    if args.enable_tts and args.tts_prompt_audio is not None and not Path(args.tts_prompt_audio).is_file():
        raise InputError(f"--tts_prompt_audio {args.tts_prompt_audio}: file not found; pass a 5-15 s recording")
    if args.ckpt_dir != "tiny" and (args.image is None or (args.audio is None and not args.enable_tts)):
        raise InputError("--image and --audio are required with a real checkpoint (or use --enable_tts with --tts_text)")
    check_pipeline_args(args)  # device, backend, FP8, attention kernel, LoRA files: before anything loads
    check_cache_args(args)     # the cache spec, and magcache's calibration file
    from runtime.media.common import _check_readable_file

    for flag, path, what in (("--image", args.image, "image"), ("--audio", None if args.enable_tts else args.audio, "audio"),
                             ("--pose_video", args.pose_video, "pose video")):
        if path is not None:
            _check_readable_file(Path(path), what, flag)


def check_output(save: Path, overwrite: bool) -> None:
    """Refuse an output that could not be written, before any work; a probe file proves the folder writable."""
    if save.is_dir():
        raise OutputError(f"--save_file {save}: is a directory; give a file name ending in .mp4")
    if save.is_symlink() and not save.exists():
        raise OutputError(f"--save_file {save}: a symbolic link to a missing file; remove the link or choose another "
                          "--save_file")
    check_mp4_name(save, "--save_file")
    parent = save.parent
    if not parent.is_dir():
        raise OutputError(f"--save_file {save}: folder {parent} does not exist; create it or choose another path")
    real = str(parent.resolve())
    if any(real == d or real.startswith(d + "/") for d in _SYSTEM_DIRS):
        raise OutputError(f"--save_file {save}: {real} is a system pseudo-filesystem; choose a normal folder")
    if save.exists() and not overwrite:
        raise OutputError(f"{save}: already exists; pass --overwrite to replace it or choose another --save_file")
    probe = parent / f".{save.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"--save_file {save}: cannot write in {parent} ({exc.strerror}); fix its permissions "
                          "or choose another folder") from None


def default_save_file(args, size: str) -> Path:
    prompt = (args.prompt or "").replace(" ", "_").replace("/", "_")[:50]
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(f"{args.task}_{size}_{args.ulysses_size}_{prompt}_{stamp}.mp4")


def run(args) -> Path:
    from runtime.media import load_audio, load_image
    from runtime.pipeline import DEFAULT_SIZE, TINY, TINY_SIZE

    tiny = args.ckpt_dir == TINY
    size = args.size or (TINY_SIZE if tiny else DEFAULT_SIZE)
    if args.prompt is None:
        args.prompt = EXAMPLE_PROMPT
    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**31 - 1)
    save = Path(args.save_file) if args.save_file else default_save_file(args, size)
    check_output(save, args.overwrite)  # refuse before spending minutes on generation

    # Inputs are decoded before the model loads, so a bad file costs seconds, not a model load.
    image = load_image(args.image) if args.image is not None else None
    audio = None
    if args.audio is not None and not args.enable_tts:
        audio = load_audio(args.audio, max_seconds=args.max_audio_s)  # duration checked before decoding
    if tiny and image is None:
        from runtime.demo import demo_image

        image = demo_image()
    if args.calibration is not None:  # a calibration of another checkpoint or recipe: refused before loading
        _check_calibration(args, image, size)
    if args.enable_tts:
        from runtime.tts import official_layout, select_tts, synthesize

        # The official ./CosyVoice2-0.5B + ./CosyVoice checkout; a voice prompt never falls back to espeak-ng.
        model_dir, repo_dir = official_layout()
        backend = select_tts(cosyvoice_dir=model_dir, cosyvoice_repo=repo_dir,
                             voice_prompt=args.tts_prompt_audio is not None or args.tts_prompt_text is not None)
        # In memory: no tts.wav is written, so no file next to the output can be clobbered or deleted.
        audio = synthesize(backend, args.tts_text, args.tts_prompt_audio, args.tts_prompt_text)
    elif tiny and audio is None:
        from runtime.demo import demo_speech

        audio = demo_speech()
    return _generate(args, image, audio, seed, size, save)


def _sample_options(args, seed: int = 0):
    from runtime.sampler import SampleOptions

    return SampleOptions(infer_frames=args.infer_frames, sample_steps=args.sample_steps or RUN.sample_steps,
                         sample_shift=args.sample_shift if args.sample_shift is not None else RUN.sample_shift,
                         guide_scale=args.sample_guide_scale if args.sample_guide_scale is not None else RUN.guide_scale,
                         solver=args.sample_solver, seed=seed, denoising_steps=args.denoising_steps)


def _check_calibration(args, image, size: str) -> None:
    from runtime.cache import calibrate_command, model_identity, recipe_of
    from runtime.preprocess import target_size

    opts = _sample_options(args)
    hw = target_size(image.height, image.width, check_size(size, "size", flag=True))
    args.calibration.check(model_identity(args.ckpt_dir, args.loras), recipe_of(opts, hw), args.calibration.path,
                           calibrate_command(args.ckpt_dir, opts, hw, args.loras))


def _out_of_memory(exc: BaseException, where: str, hint: str):
    """One line for an allocation failure (GPU or host), or None for any other error."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return S2VError(f"GPU out of memory {where}; try {hint}, --max_gpu_memory GIB (or --offload blocks), "
                        "--offload_model true or --t5_cpu")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate" in str(exc)):
        return S2VError(f"CPU out of memory (host RAM) {where}; try {hint}, close other programs, or use a machine "
                        "with more memory")
    return None


def _generate(args, image, audio, seed: int, size: str, save: Path) -> Path:
    from runtime.pipeline import S2VPipeline

    from runtime import parallel

    t0 = time.perf_counter()
    layout = parallel.init(args.ulysses_size, args.cfg_parallel, args.device)  # None for one process
    main_rank = layout is None or layout.is_main
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports progress and writes the MP4
    try:
        kwargs = pipeline_kwargs(args)
        if layout is not None:
            kwargs["device"] = layout.device
        pipe = S2VPipeline.from_pretrained(args.ckpt_dir, parallel=layout, **kwargs)
    except (RuntimeError, MemoryError) as exc:
        err = _out_of_memory(exc, f"while loading {args.ckpt_dir}", "another device")
        if err is None:
            raise
        raise err from None
    logging.info("loaded %s on %s in %.1fs (backend %s, offload %s)", args.ckpt_dir, pipe.device, time.perf_counter() - t0,
                 pipe.backend_name, pipe.offload)
    logging.info("seed %d", seed)
    t0 = time.perf_counter()
    try:
        kwargs = dict(prompt=args.prompt, seed=seed, infer_frames=args.infer_frames,
                      sample_steps=args.sample_steps or RUN.sample_steps, num_clip=args.num_clip, pose_video=args.pose_video, size=size,
                      sample_shift=args.sample_shift if args.sample_shift is not None else RUN.sample_shift,
                      guide_scale=args.sample_guide_scale if args.sample_guide_scale is not None else RUN.guide_scale,
                      sample_solver=args.sample_solver, start_from_ref=args.start_from_ref,
                      denoising_steps=args.denoising_steps,
                      batch_cfg=not args.no_batch_cfg, max_audio_s=args.max_audio_s,
                      cache=args.cache_spec, cache_calibration=args.cache_calibration or
                      (args.calibration.path if args.calibration is not None else None),
                      progress=None if main_rank else False)
        if main_rank:
            # Each clip is encoded as soon as it is decoded: host memory stays flat in the audio length.
            result = pipe.generate_mp4(save, image, audio, overwrite=args.overwrite, **kwargs)
        else:  # the other ranks take part in every step and write nothing
            result = pipe.generate(image, audio, on_clip=lambda frames: None, **kwargs)
    except OutputError as err:  # the library's wording names its argument; here it is the flag
        raise OutputError(str(err).replace("pass overwrite=True", "pass --overwrite")) from None
    except (RuntimeError, MemoryError) as exc:
        err = _out_of_memory(exc, f"at --size {size}, --infer_frames {args.infer_frames}",
                             "a smaller --size (e.g. 832*480), --infer_frames 48")
        if err is None:
            raise
        raise err from None
    if not main_rank:
        return save
    (height, width), out = result.info["size"], save
    logging.info("generated %d frames (%dx%d, %d clips) in %.1fs → %s", result.info["frames"], width, height,
                 result.info["clips"], time.perf_counter() - t0, out)
    return out


class _Terminated(BaseException):
    pass


class _SignalWatch:
    """SIGINT/SIGTERM/SIGHUP are honoured within SIGNAL_GRACE_S even while the main thread is inside a native call
    (SIGHUP, a closed terminal, as SIGTERM).

    Python runs signal handlers only between bytecodes of the main thread, so a long DiT forward or checkpoint
    read would delay them by seconds or minutes. The C-level handler also writes the signal number to a pipe
    (``signal.set_wakeup_fd``); a thread wakes on it, gives the main thread the grace period to unwind normally
    (removing its temporary files), and otherwise removes the unpublished temporary files itself
    (``runtime.media.atomic.remove_live_temps``) and exits with the signal's code."""

    def __init__(self, grace_s: float = SIGNAL_GRACE_S):
        self.grace_s = grace_s
        self.done = threading.Event()

    def __enter__(self):
        def on_term(signum, frame):
            raise _Terminated(signum)

        self.active = threading.current_thread() is threading.main_thread()  # signals exist only there
        if not self.active:
            return self
        self.old_term = signal.signal(signal.SIGTERM, on_term)
        self.old_hup = signal.signal(signal.SIGHUP, on_term)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.old_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="signal-watch", daemon=True).start()
        return self

    def _watch(self) -> None:
        try:
            self._wait_for_signal()
        finally:
            os.close(self.read_fd)

    def _wait_for_signal(self) -> None:
        while True:
            data = os.read(self.read_fd, 64)
            if not data or self.done.is_set():
                return
            codes = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM, signal.SIGHUP: EXIT_SIGHUP}
            hits = [codes[s] for s in data if s in codes]
            if hits and not self.done.wait(self.grace_s):
                from runtime.media.atomic import remove_live_temps

                remove_live_temps()  # the main thread is stuck in a native call: its cleanup will not run
                print("interrupted: no output written" if hits[0] == EXIT_SIGINT else "terminated: no output written",
                      file=sys.stderr, flush=True)
                os._exit(hits[0])

    def __exit__(self, *exc):
        self.done.set()
        if not self.active:
            return False
        signal.set_wakeup_fd(self.old_fd)
        signal.signal(signal.SIGTERM, self.old_term)
        signal.signal(signal.SIGHUP, self.old_hup)
        os.close(self.write_fd)  # the watcher's read returns EOF and it ends
        return False


class _warnings_as_log_lines:
    """Library warnings (long prompt, short pose video) as one log line each, without the source line."""

    def __enter__(self):
        import warnings

        self.old = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest, **kw: logging.warning("%s", message)

    def __exit__(self, *exc):
        import warnings

        warnings.showwarning = self.old
        return False


def main(argv: list[str] | None = None) -> int:
    # The signal handlers first: parsing imports torch (seconds on a busy machine), and a SIGTERM in that window
    # must still end in "terminated" and exit code 143, not in the default kill.
    try:  # around the `with`: a signal may land while the watch itself is being installed
        with _SignalWatch(), _warnings_as_log_lines():
            return _main(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return EXIT_SIGINT
    except _Terminated as term:
        print("terminated: no output written", file=sys.stderr)
        return EXIT_SIGHUP if term.args and term.args[0] == signal.SIGHUP else EXIT_SIGTERM


def _main(args) -> int:
    from runtime.hostmem import release_large_frees

    release_large_frees()  # peak host memory flat in the audio length (clips are streamed to the MP4)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        logging.getLogger("transformers").setLevel(logging.ERROR)

    from runtime import parallel

    try:
        validate(args)
        out = run(args)
        if parallel.is_main():
            print(out)
        return 0
    except S2VError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        parallel.shutdown()  # every rank leaves the process group, on success, error or interrupt

if __name__ == "__main__":
    sys.exit(main())
