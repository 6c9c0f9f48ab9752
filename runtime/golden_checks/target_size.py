"""Target-size parity: ``target_size`` against every (h, w, area) -> (H, W) case of the manifest."""
from __future__ import annotations

from pathlib import Path

from runtime.golden import Case, failed
from runtime.preprocess import target_size

COMPONENT = "target_size"


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    cases = manifest.get(COMPONENT)
    if not isinstance(cases, list) or not cases:
        return [failed(COMPONENT, "-", "manifest has no target_size case list")]
    rows: list[Case] = []
    for c in cases:
        name = f"{c['h']}x{c['w']}@{c['area']}"
        try:
            out = target_size(int(c["h"]), int(c["w"]), int(c["area"]))
        except Exception as err:  # one bad case must not hide the others
            rows.append(failed(COMPONENT, name, f"{type(err).__name__}: {err}"))
            continue
        ref = tuple(int(x) for x in c["out"])
        exact = tuple(out) == ref
        rows.append(Case(COMPONENT, name, 0.0 if exact else float("inf"), 0.0 if exact else float("inf"), 0.0,
                         "" if exact else f"got {out[0]}x{out[1]}, want {ref[0]}x{ref[1]}"))
    return rows
