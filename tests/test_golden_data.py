"""The shipped reference data (tests/golden) and the ``python -m runtime.golden`` command that checks against it."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from runtime import golden
from tests.conftest import GOLDEN, golden_manifest

ROOT = Path(__file__).resolve().parents[1]
NOT_DATA = {"README.md", ".gitattributes", "SHA256SUMS"}


def test_golden_files_are_the_recorded_bytes():
    """A clone that got LFS pointers, converted line endings or lost a file fails here, not in a parity check."""
    listed = {}
    for line in (GOLDEN / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {p.name for p in GOLDEN.iterdir()} - NOT_DATA
    assert present == set(listed), "tests/golden and its SHA256SUMS name different files"
    for name, digest in listed.items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, f"{name} differs from the recorded bytes"


def test_every_golden_file_is_read_by_a_check():
    """Files no check reads would be dead weight in every clone: each one is named by the checks or the manifest."""
    checks = "".join(p.read_text() for p in (ROOT / "runtime" / "golden_checks").glob("*.py"))
    manifest = (GOLDEN / "manifest.json").read_text()
    per_key = {f"{key}_io.safetensors" for key in golden_manifest()}  # the e2e checks' f"{key}_io.safetensors"
    unread = [n for n in {p.name for p in GOLDEN.iterdir()} - NOT_DATA - {"manifest.json"} - per_key
              if n not in checks and f'"{n}' not in manifest]
    assert not unread, unread


def test_cli_defaults_to_the_shipped_data(capsys):
    assert golden.DEFAULT_DIR == GOLDEN
    assert golden.main(["--only", "target_size,audio"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("target_size ", "audio "))]
    assert len(rows) > len(golden_manifest()["target_size"]) and all(" PASS" in line for line in rows)
    assert f"{len(rows)} passed, 0 failed" in out


def test_cli_takes_an_explicit_folder_and_names_a_missing_one(tmp_path, capsys):
    assert golden.main([str(GOLDEN), "--only", "target_size"]) == 0
    assert golden.main([str(tmp_path), "--only", "target_size"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'manifest.json'} not found; pass the folder")


def test_cli_runs_from_any_directory(tmp_path):
    """``python -m runtime.golden`` with no folder finds the data from its own location, not the working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's runtime, whichever one is installed
    res = subprocess.run([sys.executable, "-m", "runtime.golden", "--only", "target_size"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failed" in res.stdout
