"""``python -m runtime.golden [DIR] [--only dit,unipc,...]``: parity against official reference data.

DIR (default: the project's ``tests/golden``) holds ``manifest.json`` plus the safetensors and media files
produced by the official Wan2.2 code (``tests/golden/README.md`` says how). Every component listed in the
manifest is run with this project's implementation, configured only from DIR; one row per case is printed and
the exit code is 0 only if every selected component passes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# The reference data ships in the source tree beside the package (not inside the wheel).
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden"

# manifest key -> module implementing ``check(golden_dir: Path, manifest: dict) -> list[Case]``
COMPONENTS: dict[str, str] = {
    "dit": "runtime.golden_checks.dit",
    "unipc": "runtime.golden_checks.unipc",
    "vae": "runtime.golden_checks.vae",
    "t5": "runtime.golden_checks.t5",
    "audio": "runtime.golden_checks.audio",
    "audio_load": "runtime.golden_checks.audio_load",
    "target_size": "runtime.golden_checks.target_size",
    "e2e": "runtime.golden_checks.e2e",
    "e2e_pose": "runtime.golden_checks.e2e",
}


@dataclass(frozen=True)
class Case:
    component: str
    case: str
    max_abs: float
    rel_l2: float
    tol: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.rel_l2 <= self.tol) and self.rel_l2 == self.rel_l2  # NaN fails


def compare(component: str, case: str, out: torch.Tensor, ref: torch.Tensor, tol: float, note: str = "") -> Case:
    """Max-abs and relative-L2 error of ``out`` against ``ref`` in float64."""
    out = torch.as_tensor(out).detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        return Case(component, case, float("inf"), float("inf"), tol, f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    diff = out - ref
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    denom = float(ref.norm())
    rel = float(diff.norm()) / denom if denom > 0 else float(diff.norm())
    return Case(component, case, max_abs, rel, tol, note)


def failed(component: str, case: str, reason: str) -> Case:
    return Case(component, case, float("nan"), float("nan"), 0.0, reason)


def run_component(name: str, golden_dir: Path, manifest: dict) -> list[Case]:
    module_name = COMPONENTS.get(name)
    if module_name is None:
        return [failed(name, "-", "unknown component: no implementation in this project")]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("runtime"):
            return [failed(name, "-", "not implemented yet")]
        raise
    try:
        if name.startswith("e2e"):
            return module.check(golden_dir, manifest, key=name)
        return module.check(golden_dir, manifest)
    except Exception as err:  # a crash is a FAIL with its reason, not a traceback over the table
        return [failed(name, "-", f"{type(err).__name__}: {err}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.golden", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, nargs="?", default=DEFAULT_DIR,
                        help="folder with manifest.json and the reference files (default: the project's tests/golden)")
    parser.add_argument("--only", default="", help="comma-separated components (default: all in the manifest)")
    args = parser.parse_args(argv)

    manifest_path = args.dir / "manifest.json"
    if not manifest_path.is_file():
        where = ("the reference data ships in a source checkout, not in an installed package: run from a clone or "
                 if args.dir == DEFAULT_DIR else "")
        print(f"error: {manifest_path} not found; {where}pass the folder that holds the golden manifest.json",
              file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    present = [k for k in manifest if k not in ("seed", "variant")]  # everything else is a component
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or present
    missing = [s for s in selected if s not in manifest]
    if missing:
        print(f"error: {', '.join(missing)} not in {manifest_path}; choose from {', '.join(present)}", file=sys.stderr)
        return 2

    torch.set_grad_enabled(False)
    rows: list[Case] = []
    print(f"{'component':<12} {'case':<28} {'max_abs':>10} {'rel_l2':>10} {'tol':>8}  result")
    for name in selected:
        t0 = time.perf_counter()
        cases = run_component(name, args.dir, manifest)
        for c in cases:
            status = "PASS" if c.passed else "FAIL"
            note = f"  ({c.note})" if c.note else ""
            print(f"{c.component:<12} {c.case:<28} {c.max_abs:>10.3g} {c.rel_l2:>10.3g} {c.tol:>8.1g}  {status}{note}")
        rows.extend(cases)
        print(f"{'':<12} {name} took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    ok = bool(rows) and all(c.passed for c in rows)
    n_fail = sum(not c.passed for c in rows)
    print(f"{len(rows) - n_fail} passed, {n_fail} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
