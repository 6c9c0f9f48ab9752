"""Build a forward-only SM90 FlashAttention-3 extension (head_dim 128, bf16 and e4m3) from ``.fa3src``.

Used by ``build_on_gpu.sh`` on the GPU machine. Drives nvcc/g++ directly (no setuptools, no ninja: neither is
guaranteed there), one process per translation unit, in parallel. Output: ``OUT/flash_attn_3/_C.abi3.so``; put
``OUT`` on ``PYTHONPATH`` and ``import flash_attn_3._C`` registers ``torch.ops.flash_attn_3.fwd``.

Translation units (``--split``, the default): the library's dispatch TU for each dtype
(``wan/fwd_hdim128_{bf16,e4m3}_sm90.cu``) declares each kernel configuration ``extern template``, and
``wan/kernel_*.cu`` instantiate one configuration each, so the five kernels compile in parallel instead of
three-then-two in two TUs. ``--no-split`` uses the library's own ``instantiations/*.cu`` instead.

``python3 native/fa3/build.py --check`` imports the result and compares it with PyTorch's SDPA on a
small problem (needs the GPU).

``--torch-root DIR`` builds without importing torch, against an unpacked torch wheel (its ``torch/`` folder) of
the GPU machine's version: a cross-build on a CPU machine (``cross_build.sh``), whose ``.so`` is carried to
the GPU machine instead of building there.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

FEATURES = [  # everything we do not call is compiled out (see hopper/setup.py's FLASH_ATTENTION_DISABLE_*)
    "BACKWARD", "PAGEDKV", "SPLIT", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "VARLEN",
    "HDIM64", "HDIM96", "HDIM192", "HDIM256", "SM8x", "HDIMDIFF64", "HDIMDIFF192",
]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--ftemplate-backtrace-limit=0", "--use_fast_math", "--resource-usage", "-lineinfo",
    "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED", "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-DCUTLASS_DEBUG_TRACE_LEVEL=0",
    "-DNDEBUG", "-gencode", "arch=compute_90a,code=sm_90a",
    # PyTorch's usual extension flags
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
]


def feature_defines() -> list[str]:
    return [f"-DFLASHATTENTION_DISABLE_{f}" for f in FEATURES]


def find_nvcc() -> Path:
    cands = [os.environ.get("NVCC", "")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.access(c, os.X_OK):
            return Path(c).resolve()
    raise SystemExit("fa3_build: nvcc not found (set CUDA_HOME or NVCC)")


def cuda_dirs(nvcc: Path) -> tuple[list[Path], list[Path]]:
    """(include dirs, library dirs) of the toolkit that holds ``nvcc``."""
    home = nvcc.parent.parent
    incs = [d for d in (home / "include", home / "include" / "cccl", home / "targets" / "x86_64-linux" / "include")
            if d.is_dir()]
    libs = [d for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib") if d.is_dir()]
    return incs, libs


class TorchTree:
    """What the build needs from torch: version, C++ ABI, include and library folders — from the importable torch,
    or from an unpacked wheel's ``torch/`` folder (``--torch-root``)."""

    def __init__(self, root: Path | None = None):
        if root is None:
            import torch
            from torch.utils.cpp_extension import include_paths, library_paths

            self.root = Path(torch.__file__).resolve().parent
            self.version, self.cuda = torch.__version__, torch.version.cuda
            self.cxx11_abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
            self.includes, self.libs = [Path(p) for p in include_paths()], [Path(p) for p in library_paths()]
        else:
            self.root = root.resolve()
            ns: dict = {}
            exec((self.root / "version.py").read_text(), ns)
            self.version, self.cuda = ns["__version__"], ns["cuda"]
            self.cxx11_abi = True  # every torch >= 2.7 wheel is built with the C++11 ABI
            self.includes = [self.root / "include", self.root / "include" / "torch" / "csrc" / "api" / "include"]
            self.libs = [self.root / "lib"]
            missing = [str(p) for p in (*self.includes, *self.libs) if not p.is_dir()]
            if missing:
                raise SystemExit(f"fa3_build: --torch-root {root}: not an unpacked torch wheel (missing {missing})")


def cudart_flags(cuda_lib: list[Path], torch_root: Path) -> list[str]:
    """Link the CUDA runtime dynamically (the one torch loads): the toolkit's, else the pip wheel's."""
    site = torch_root.parent / "nvidia"
    for d in [*cuda_lib, site / "cu13" / "lib", site / "cuda_runtime" / "lib"]:
        if (d / "libcudart.so").exists():
            return [f"-L{d}", "-lcudart"]
        versioned = sorted(d.glob("libcudart.so.*")) if d.is_dir() else []
        if versioned:
            return [f"-L{d}", f"-l:{versioned[0].name}"]
    raise SystemExit(f"fa3_build: libcudart not found in {cuda_lib} or {site}")


def sources(src: Path, split: bool) -> tuple[list[Path], Path]:
    h = src / "hopper"
    if split:
        cu = sorted((h / "wan").glob("kernel_*.cu")) + sorted((h / "wan").glob("fwd_*.cu"))
    else:
        cu = [h / "instantiations" / "flash_fwd_hdim128_bf16_sm90.cu", h / "instantiations" / "flash_fwd_hdim128_e4m3_sm90.cu"]
    cu.append(h / "flash_prepare_scheduler.cu")
    missing = [str(p) for p in cu if not p.is_file()]
    if missing:
        raise SystemExit(f"fa3_build: missing sources in {src}: {missing}")
    return cu, h / "flash_api_stable.cpp"


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t


def build(src: Path, out: Path, jobs: int, split: bool, torch_root: Path | None = None) -> Path:
    tt = TorchTree(torch_root)
    src, out = src.resolve(), out.resolve()
    nvcc = find_nvcc()
    cuda_inc, cuda_lib = cuda_dirs(nvcc)
    ver = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"fa3_build: torch {tt.version} (CUDA {tt.cuda}) at {tt.root}, nvcc {nvcc} ({ver}), {jobs} jobs, "
          f"split={split}", flush=True)
    objdir = out / "build"
    objdir.mkdir(parents=True, exist_ok=True)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(tt.cxx11_abi)}"
    inc_common = [f"-I{src / 'hopper'}", f"-I{src / 'csrc' / 'cutlass' / 'include'}"]
    # CUDA 13 keeps CCCL (cuda/std, cub, thrust) under include/cccl; FA's setup.py adds it to the include path
    cccl = [f"-I{d}" for d in cuda_inc if d.name == "cccl"]
    cu, api = sources(src, split)
    jobs_list = []
    for f in cu:
        obj = objdir / (f.stem + ".o")
        cmd = [str(nvcc), "-c", str(f), "-o", str(obj), *inc_common, *cccl, *NVCC_FLAGS, *feature_defines(), abi]
        jobs_list.append((f.name, obj, cmd))
    cxx = os.environ.get("CXX", "g++")
    py_inc = sysconfig.get_paths()["include"]
    api_obj = objdir / "flash_api_stable.o"
    api_cmd = [cxx, "-c", str(api), "-o", str(api_obj), "-O3", os.environ.get("FA3_CXX_STD", "-std=c++17"), "-fPIC",
               "-DPy_LIMITED_API=0x03090000", "-DTORCH_TARGET_VERSION=0x0209000000000000",
               "-DTORCH_EXTENSION_NAME=_C", abi, *inc_common, *[f"-I{p}" for p in tt.includes],
               *[f"-I{p}" for p in cuda_inc], f"-I{py_inc}", *feature_defines()]
    jobs_list.insert(0, (api.name, api_obj, api_cmd))
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{nvcc.parent}:{env_path}"  # nvcc finds cicc/ptxas relative to itself, but be safe
    t0 = time.time()
    failed = []
    with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(run, cmd, objdir / (name + ".log")): (name, obj) for name, obj, cmd in jobs_list}
        for fut in cf.as_completed(futs):
            name, obj = futs[fut]
            rc, dt = fut.result()
            print(f"fa3_build: {name}: {'ok' if rc == 0 else f'FAILED rc={rc}'} in {dt:.0f} s "
                  f"(at {time.time() - t0:.0f} s)", flush=True)
            if rc:
                failed.append(name)
    for name, obj, _ in jobs_list:
        log = (objdir / (name + ".log")).read_text(errors="replace")
        spills = [ln.strip() for ln in log.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes")]
        if name in failed:
            print(f"---- {name} (last 60 lines of {objdir / (name + '.log')}) ----\n" + "\n".join(log.splitlines()[-60:]))
        elif spills:
            print(f"fa3_build: {name}: register spills: {spills[:4]}")
    if failed:
        raise SystemExit(f"fa3_build: {len(failed)} translation unit(s) failed: {failed}")
    pkg = out / "flash_attn_3"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""FlashAttention-3, forward-only SM90 build (head_dim 128, bf16/e4m3)."""\n')
    target = pkg / "_C.abi3.so"
    tlib = tt.libs
    link = [cxx, "-shared", "-o", str(target), *[str(o) for _, o, _ in jobs_list],
            *[f"-L{p}" for p in tlib], *[f"-Wl,-rpath,{p}" for p in tlib],
            "-lc10", "-ltorch", "-ltorch_cpu", "-lc10_cuda", "-ltorch_cuda", *cudart_flags(cuda_lib, tt.root)]
    rc, dt = run(link, objdir / "link.log")
    if rc:
        print((objdir / "link.log").read_text(errors="replace")[-4000:])
        raise SystemExit("fa3_build: link failed")
    print(f"fa3_build: linked {target} ({target.stat().st_size / 2**20:.1f} MiB); compile+link {time.time() - t0:.0f} s",
          flush=True)
    return target


def check(out: Path) -> None:
    """Import the build and compare both ops with SDPA on a small problem (GPU)."""
    sys.path.insert(0, str(out.resolve()))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for runtime.kernels
    import torch
    import torch.nn.functional as F

    from runtime.kernels import fa3
    from runtime.kernels.fp8 import quantize_heads

    why = fa3.available(torch.device("cuda"))
    if why:
        raise SystemExit(f"fa3_build --check: {why}")
    torch.manual_seed(0)
    # a fused-QKV layout (seq stride 3·H·D) as the model produces it; 2 batches to exercise the descale strides
    qkv = torch.randn(2, 1000, 3, 8, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = fa3.attention(q, k, v)
    e = float((out.float() - ref).norm() / ref.norm())
    (q8, dq), (k8, dk), (v8, dv) = (quantize_heads(t) for t in (q, k, v))
    out8 = fa3.attention_fp8(q8, k8, v8, dq, dk, dv)
    e8 = float((out8.float() - ref).norm() / ref.norm())
    print(f"fa3_build --check: bf16 rel-L2 {e:.2e} ({out.dtype}, {tuple(out.shape)}); "
          f"fp8 rel-L2 {e8:.2e} ({out8.dtype})", flush=True)
    if not (e < 1e-2 and e8 < 0.1):
        raise SystemExit("fa3_build --check: results differ from SDPA")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(".fa3src"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/fa3"))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "16")))
    ap.add_argument("--no-split", dest="split", action="store_false")
    ap.add_argument("--check", action="store_true", help="only import the build and compare with SDPA")
    ap.add_argument("--torch-root", type=Path, default=None,
                    help="an unpacked torch wheel's torch/ folder to build against, without importing torch")
    args = ap.parse_args()
    if args.check:
        check(args.out)
    else:
        build(args.src, args.out, args.jobs, args.split, args.torch_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
