"""``python -m export.build --precision fp16``: ONNX export, validation, TensorRT engines with manifests.

    python -m export.build --precision fp16 --ckpt_dir Wan2.2-S2V-14B --out engines
    python -m export.build --precision fp16 --ckpt_dir tiny --out /tmp/e --onnx-only

Steps: (1) load the DiT and audit the BF16 → FP16 conversion, (2) export the DiT step to one FP16 graph with
dynamic axes, and the VAE encoder/decoder (first-chunk and step graphs) to FP32 graphs, (3) check every
graph against TensorRT's ONNX op list and run it in ONNX Runtime against PyTorch; every graph gets a
manifest (``<stem>.manifest.json``: hash, I/O, checkpoint), (4) unless --onnx-only, build engines with
TensorRT 10/11 or TensorRT-RTX (``--trt``; RTX builds without a GPU, for ``--compute-capability`` targets)
into ``OUT/<component>/<key>/`` with a manifest. Without either, it stops after step 3 with one line saying
how to install one (exit code 3).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from export.files import check_out, inside
from runtime.quoting import shown

log = logging.getLogger("export.build")
EXIT_NO_TRT = 3


RANDOM_14B = "random-14b"  # the real architecture with random weights (speed/size work without the checkpoint)
OPT_SIZE_14B = (704, 1024)


def load_dit(ckpt: str, device: torch.device, loras=()):
    """The DiT of ``ckpt`` with ``loras`` merged (the same merge as ``runtime.lora`` at run time)."""
    from runtime import lora
    from runtime.config import DiTConfig
    from runtime.models.dit import build_dit, load_dit as _load
    from runtime.tiny import tiny_dit

    if ckpt == "tiny":
        model = tiny_dit(torch.float32, device)
    elif ckpt == RANDOM_14B:
        model = build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)
    else:
        model = _load(ckpt, dtype=torch.bfloat16, device=device)
    lora.merge(model, loras, round_dtype=model.dtype)
    return model


def load_vae(ckpt: str, device: torch.device):
    from runtime.checkpoint import VAE_FILE
    from runtime.models.vae import VAEConfig, WanVAE, load_vae as _load
    from runtime.tiny import tiny_vae

    if ckpt == RANDOM_14B:
        with torch.device(device):
            return WanVAE(VAEConfig.wan21()).eval().requires_grad_(False)
    return tiny_vae(device) if ckpt == "tiny" else _load(Path(ckpt) / VAE_FILE, device=device)


def mean_rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).mean() / max(np.abs(ref).mean(), 1e-30))


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" and "CUDAExecutionProvider" in have \
        else ["CPUExecutionProvider"]


def export_and_check_dit(args, device, report: dict) -> Path:
    from export.manifest import write_onnx_manifest
    from export.onnx_dit import INPUT_NAMES, example_inputs, export_dit, fp16_audit, graph_inputs, to_fp16
    from export.trt_ops import check_graph
    import onnx

    model = load_dit(args.ckpt_dir, device, args.loras)
    cfg = model.cfg
    frames, lat_h, lat_w = args.check_shape
    ex = example_inputs(model, frames, lat_h, lat_w, motion=True, batch=2)
    audit = fp16_audit(model, *ex[:2], __import__("runtime.models.dit", fromlist=["ClipConditions"]).ClipConditions(*ex[2:]))
    log.info("FP16 audit: %s", audit.summary())
    report["fp16_audit"] = audit.to_dict()

    # FP32 reference on the validation shape, before the model is converted
    ref = None
    if not args.no_validate or args.save_check:
        ref_model = model if model.dtype == torch.float32 else None
        if ref_model is None:  # bf16 checkpoint: an FP32 copy of the same weights is the reference
            from runtime.models.dit import WanS2VDiT
            with torch.device("meta"):
                ref_model = WanS2VDiT(cfg)
            ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
        ref_ex = tuple(t.float() for t in ex)
        ref = ref_model.step(*ref_ex).float().cpu().numpy()
        if args.save_check:  # validate later (e.g. in another process with onnxruntime-gpu)
            Path(args.save_check).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"inputs": [t.cpu() for t in graph_inputs(ex)], "ref": torch.from_numpy(ref),
                        "names": list(INPUT_NAMES)}, args.save_check)
        if ref_model is not model:
            del ref_model
            torch.cuda.empty_cache() if device.type == "cuda" else None

    to_fp16(model, audit.keep_fp32)
    onnx_path = Path(args.out) / "onnx" / "dit" / "model.onnx"
    inside(onnx_path.parent, args.out)  # checked again right before writing (the folder may have been replaced)
    stats = export_dit(model, onnx_path, graph_inputs(ex))
    write_onnx_manifest(onnx_path, "dit", args.precision, args.ckpt_dir, keep_fp32=audit.keep_fp32,
                        loras=args.lora_identity)
    log.info("DiT ONNX: %s", stats)
    report["dit_export"] = stats
    graph = onnx.load(str(onnx_path), load_external_data=False)
    ops = check_graph(graph)
    report["dit_ops"] = ops.describe()
    if not ops.ok:
        raise SystemExit(f"error: {shown(onnx_path)}: {ops.describe()}")
    if ref is not None and not args.save_check:
        import onnxruntime as ort

        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(onnx_path), providers=ort_providers(device))
        feeds = {n: t.cpu().numpy() for n, t in zip(INPUT_NAMES, graph_inputs(ex))}
        out = sess.run(None, feeds)[0]
        rel = mean_rel(out, ref)
        report["dit_ort"] = {"mean_rel": rel, "provider": sess.get_providers()[0], "shape": list(out.shape),
                             "session_plus_run_s": round(time.perf_counter() - t0, 1)}
        log.info("DiT ONNX Runtime (%s) vs PyTorch fp32: mean rel %.2e", sess.get_providers()[0], rel)
        if not rel <= 1e-2:
            raise SystemExit(f"error: DiT FP16 ONNX differs from PyTorch fp32 (mean rel {rel:.3g} > 1e-2)")
    return onnx_path


def export_and_check_vae(args, device, report: dict) -> list[Path]:
    import onnx
    import onnxruntime as ort

    from export.manifest import write_onnx_manifest
    from export.onnx_vae import GRAPHS, _Graph, example, export_vae_graph
    from export.trt_ops import check_graph

    vae = load_vae(args.ckpt_dir, device)
    paths = []
    h, w = args.vae_check_size
    for kind in GRAPHS:
        path = Path(args.out) / "onnx" / "vae" / f"{kind}.onnx"
        inside(path.parent, args.out)
        stats = export_vae_graph(vae, kind, path, h, w)
        write_onnx_manifest(path, f"vae_{kind}", "fp32", args.ckpt_dir)
        ops = check_graph(onnx.load(str(path), load_external_data=False))
        if not ops.ok:
            raise SystemExit(f"error: {shown(path)}: {ops.describe()}")
        if not args.no_validate:
            xs = example(vae, kind, h, w, seed=1)
            with torch.no_grad():
                ref = [t.float().cpu().numpy() for t in _Graph(vae, kind)(*xs)]
            sess = ort.InferenceSession(str(path), providers=ort_providers(device))
            out = sess.run(None, {i.name: x.cpu().numpy() for i, x in zip(sess.get_inputs(), xs)})
            rel = max(float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)) for o, r in zip(out, ref))
            stats["ort_rel_l2"] = rel
            if not rel <= 1e-4:
                raise SystemExit(f"error: VAE {kind} ONNX differs from PyTorch (rel-L2 {rel:.3g} > 1e-4)")
        log.info("VAE %s: %s", kind, stats)
        report.setdefault("vae", []).append(stats)
        paths.append(path)
    return paths


def dit_config(ckpt: str):
    from runtime.config import DiTConfig

    return (DiTConfig.tiny() if ckpt == "tiny" else DiTConfig.s2v_14b() if ckpt == RANDOM_14B
            else DiTConfig.from_json(Path(ckpt) / "config.json"))


def profile_sizes(ckpt: str):
    """Pixel sizes the engines must take: the official 480p-720p rule, or the tiny model's demo/test sizes."""
    from export.profiles import reachable_sizes

    if ckpt == "tiny":
        return reachable_sizes(areas=(64 * 64, 128 * 128)) | {(64, 96)}
    return reachable_sizes()


def build_engines(args, dit_onnx: Path | None, vae_onnx: list[Path], report: dict) -> None:
    from export import trt as trtw
    from export.manifest import checkpoint_identity, engine_key, onnx_sha256, write_manifest
    from export.profiles import FRAMES, dit_profiles, vae_profile
    from runtime.manifest import io_mismatch, onnx_manifest_path, read_manifest, sha256_file

    flavor = trtw.select_flavor(args.trt)
    gpu = gpu_cc = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, gpu_cc = props.name, f"{props.major}.{props.minor}"
    ccs = trtw.targets(flavor, args.compute_capability, gpu_cc)
    log.info("building with %s %s for compute capabilities %s", flavor.name, flavor.version, ", ".join(ccs))
    common = {"kind": "engine", "runtime": flavor.name, "runtime_version": flavor.version, "compute_capabilities": ccs,
              "gpu": gpu if not flavor.rtx else None, "checkpoint": checkpoint_identity(args.ckpt_dir)}
    out = Path(args.out)
    cache = out / "timing.cache"
    sizes = profile_sizes(args.ckpt_dir)
    jobs = []
    if dit_onnx is not None:
        cfg = dit_config(args.ckpt_dir)
        tiny = args.ckpt_dir == "tiny"  # its check shape has 3 latent frames (12 pixel frames)
        profiles = dit_profiles(cfg, sizes, opt_size=(64, 64) if tiny else OPT_SIZE_14B, frames=(12, 80) if tiny else FRAMES)
        jobs.append(("dit", dit_onnx, args.precision, [p.to_dict() for p in profiles], [p.shapes(cfg) for p in profiles],
                     {"opt_level": args.opt_level, "strip_plan": args.strip_plan, "strongly_typed": True}, None))
    vp = vae_profile(sizes, opt_size=(64, 64) if args.ckpt_dir == "tiny" else None)
    for path in vae_onnx:
        kind = path.stem
        jobs.append((f"vae_{kind}", path, "fp32", [{k: v.__dict__ for k, v in vp.items()}], [vae_shapes(args, kind, vp)],
                     {"tf32": args.vae_tf32, "opt_level": args.opt_level}, args.vae_tf32))
    for component, onnx_path, precision, profile_dicts, profile_shapes, flags, tf32 in jobs:
        onnx_manifest = read_manifest(onnx_manifest_path(onnx_path), out)
        fields = {**common, "component": component, "precision": precision, "onnx_sha256": onnx_sha256(onnx_path),
                  "profiles": profile_dicts, "flags": flags, "io": onnx_manifest["io"],
                  "loras": onnx_manifest.get("loras") or []}
        if fields["onnx_sha256"] != onnx_manifest["onnx_sha256"]:
            raise SystemExit(f"error: {shown(onnx_path)} changed after it was exported; re-run export.build")
        folder = inside(out / component / engine_key(fields), out)
        stats = trtw.build_engine(flavor, onnx_path, folder / "engine.plan", profile_shapes, compute_capabilities=ccs,
                                  opt_level=args.opt_level, timing_cache=cache, tf32=tf32,
                                  strip_plan=args.strip_plan and component == "dit")
        network_io = stats.pop("io")
        why = io_mismatch(onnx_manifest["io"], network_io)
        if why:  # the parser renamed, retyped or reshaped an input/output: the runtime binds by the ONNX's
            raise SystemExit(f"error: {component} engine I/O differs from the ONNX graph ({why})")
        write_manifest(folder, {**fields, **stats, "plan_sha256": sha256_file(folder / "engine.plan"),
                                "onnx_path": str(onnx_path.relative_to(out))})
        log.info("%s engine: %s (%s)", component, shown(folder), stats)
        report.setdefault("engines", []).append({"component": component, "folder": str(folder), **stats})


def vae_shapes(args, kind: str, vp) -> dict:
    """min/opt/max of every VAE graph input: spatial sizes scale linearly with the pixel size."""
    from export.onnx_vae import example, io_names
    from runtime.tiny import tiny_vae

    vae = load_vae(args.ckpt_dir, torch.device("cpu")) if args.ckpt_dir != "tiny" else tiny_vae()
    base = example(vae, kind, 64, 64)
    names, _ = io_names(vae, kind, len(base))
    shapes = {}
    for name, t in zip(names, base):
        sh, sw = 64 // t.shape[-2], 64 // t.shape[-1]
        dims = lambda H, W: (*t.shape[:-2], H // sh, W // sw)  # noqa: E731
        h, w = vp["height"], vp["width"]
        shapes[name] = (dims(h.min, w.min), dims(h.opt, w.opt), dims(h.max, w.max))
    return shapes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.build", description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp16", choices=["fp16"], help="DiT engine precision (the VAE is always fp32)")
    ap.add_argument("--ckpt_dir", default="tiny", help="Wan2.2-S2V-14B folder, or 'tiny'")
    ap.add_argument("--out", default="engines", help="output folder (ONNX under OUT/onnx, engines under OUT/<component>/<key>)")
    ap.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export and checks")
    ap.add_argument("--components", default="dit,vae", help="comma list of dit,vae")
    ap.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5")
    ap.add_argument("--strip-plan", action="store_true", help="weightless plan, refitted from the ONNX at load")
    ap.add_argument("--vae-tf32", action="store_true", help="allow TF32 in the FP32 VAE engines (default: off, exact FP32)")
    ap.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime parity runs")
    ap.add_argument("--check-shape", type=int, nargs=3, default=None, metavar=("FRAMES", "LAT_H", "LAT_W"),
                    help="DiT validation shape in latent units (default: 3 8 12 for tiny, 12 56 104 = 448x832/48 frames)")
    ap.add_argument("--vae-check-size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"))
    ap.add_argument("--save-check", default=None, help="save the DiT validation inputs and FP32 reference here "
                    "(checked later by benchmarks.ort_fullsize) instead of running ONNX Runtime now")
    ap.add_argument("--trt", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"],
                    help="engine builder: TensorRT 10/11, TensorRT-RTX, or auto (TensorRT if importable, else RTX)")
    ap.add_argument("--compute-capability", default=None, metavar="CC[,CC...]",
                    help="TensorRT-RTX targets, e.g. 8.6,8.9,12.0 (default: this GPU; without one 8.0,8.6,8.9,12.0)")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                    help="merge this LoRA into the DiT before export (repeatable; strength default 1.0); the manifests "
                         "record each file's sha256 and strength, and the runtime refuses engines of another merge")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.check_shape is None:
        args.check_shape = (3, 8, 12) if args.ckpt_dir == "tiny" else (12, 56, 104)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_grad_enabled(False)
    comps = {c.strip() for c in args.components.split(",") if c.strip()}
    unknown = sorted(comps - {"dit", "vae"})
    if unknown or not comps:
        print(f"error: --components {args.components!r}: unknown component(s) {', '.join(unknown) or '(none given)'}; "
              "choose from dit, vae (comma-separated)", file=sys.stderr)
        return 2
    from export.files import write_text
    from runtime.errors import S2VError

    try:  # a bad --out fails now, in one line, before the model loads
        from export.onnx_vae import GRAPHS

        check_out(args.out, ["onnx/dit", "onnx/vae", "dit"] + [f"vae_{g}" for g in GRAPHS])
    except S2VError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    report: dict = {"command": "python -m export.build " + " ".join(sys.argv[1:] if argv is None else argv)}

    class Terminated(BaseException):
        pass

    def on_term(signum, frame):
        raise Terminated()

    import signal

    # Unwind through the cleanup of partial ONNX/engine files; the caller's handler is restored on the way out
    # (main may run inside another program, e.g. a test process).
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        from runtime import lora

        args.loras = [lora.LoraSpec.parse(s) for s in args.lora]
        if args.loras:  # keys and shapes against the model before it loads
            from runtime.pipeline import check_loras

            check_loras(args.loras, dit_config(args.ckpt_dir))
        args.lora_identity = lora.identity(args.loras)
        if not args.onnx_only:  # a bad --trt/--compute-capability fails now, not after the export
            from export import trt as trtw

            if trtw.available(args.trt)[0]:
                flavor = trtw.select_flavor(args.trt)
                cc = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
                trtw.targets(flavor, args.compute_capability, f"{cc[0]}.{cc[1]}" if cc else None)
        t0 = time.perf_counter()
        dit_onnx = export_and_check_dit(args, device, report) if "dit" in comps else None
        vae_onnx = export_and_check_vae(args, device, report) if "vae" in comps else []
        report["onnx_total_s"] = round(time.perf_counter() - t0, 1)
        import resource

        report["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if device.type == "cuda":
            report["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "export_report.json", json.dumps(report, indent=2, default=str) + "\n")
        if args.onnx_only:
            print(f"ONNX written to {shown(out / 'onnx')} (report: {shown(out / 'export_report.json')})")
            return 0
        from export import trt as trtw

        ok, why = trtw.available(args.trt)
        if not ok:
            print(f"ONNX written to {shown(out / 'onnx')}; engines not built: {why}", file=sys.stderr)
            return EXIT_NO_TRT
        build_engines(args, dit_onnx, vae_onnx, report)
        write_text(out / "export_report.json", json.dumps(report, indent=2, default=str) + "\n")
        print(f"engines written under {shown(out)}")
        return 0
    except S2VError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: partial files removed", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: partial files removed", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
