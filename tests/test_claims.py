"""benchmarks.claims: every measured number in README.md and docs/*.md has a source, and the checker can fail."""
from __future__ import annotations

import os
from pathlib import Path

from benchmarks import claims

HEADLINE = claims.RESULTS / "nvidia-h200" / "run_later-704x1024-80f_fa3-official.md"  # official 9.984 s, ours 7.590 s


def problems(tmp_path: Path, text: str) -> list[str]:
    doc = tmp_path / "doc.md"
    doc.write_text(text.replace("LINK", os.path.relpath(HEADLINE, tmp_path)))
    return claims.check_file(doc)


def test_readme_and_docs_pass():
    found = [p for f in claims.default_files() for p in claims.check_file(f)]
    assert not found, "numbers without a source (python -m benchmarks.claims):\n" + "\n".join(found)


def test_unsourced_and_mismatched_numbers_are_reported(tmp_path):
    out = problems(tmp_path, "Ours takes 7.59 s per forward.\n\n"
                             "Per [the run](LINK) ours takes 7.77 s and the official 9.98 s.\n")
    assert len(out) == 2, out
    assert "doc.md:1: 7.59 s: no source" in out[0]
    assert "doc.md:3: 7.77 s: not in the linked result(s) run_later-704x1024-80f_fa3-official.json" in out[1]


def test_sourced_external_and_derived_numbers_pass(tmp_path):
    assert problems(tmp_path, "Per [the run](LINK): 7.59 s, ~7.6 s, official 9.98–9.984 s, rel-L2 0.007.\n\n"
                              "A peer reports 2.1× (external: https://example.org/paper, table 3).\n\n"
                              "[Run](LINK): 1.32× (= 9.984 / 7.590) the official forward.\n") == []


def test_a_wrong_derivation_or_an_unsourced_operand_is_reported(tmp_path):
    out = problems(tmp_path, "[Run](LINK): 1.40× (= 9.984 / 7.590).\n\n[Run](LINK): 1.31× (= 9.984 / 7.62).\n")
    assert len(out) == 2, out
    assert "doc.md:1: 1.40 ×: (= 9.984 / 7.590) gives 1.31542" in out[0]
    assert "doc.md:3: 1.31 ×: operand 7.62" in out[1]


def test_rounding_is_that_of_the_printed_digits(tmp_path):
    assert problems(tmp_path, "[Run](LINK): 7.590 s.\n") == []       # 7.5896
    assert len(problems(tmp_path, "[Run](LINK): 7.580 s.\n")) == 1   # off by one in the last printed digit


def test_table_cells_inherit_their_column_unit_and_rows_see_the_caption(tmp_path):
    table = ("| variant | forward | rel-L2 |\n|---|---|---|\n"
             "| official | 9.98 s | — |\n| ours | 7.61 | 0.007 |\n| ours, 2 steps | 4.44 | 0.5 |\n")
    out = problems(tmp_path, table)
    assert sorted(o.split(": ", 1)[1].split(":")[0] for o in out) == ["0.007 (rel-L2)", "0.5 (rel-L2)", "4.44 (s)",
                                                                     "7.61 (s)", "9.98 s"], out
    captioned = problems(tmp_path, "Results: [run](LINK).\n" + table)
    assert sorted(o.split(": ", 1)[1].split(":")[0] for o in captioned) == ["0.5 (rel-L2)", "4.44 (s)",
                                                                           "7.61 (s)"], captioned


def test_code_counts_sizes_and_bounds_are_not_claims(tmp_path):
    assert problems(tmp_path, "Run `--max_audio_s 600 s` at 704×1024, 80 frames, 40 steps on 2 GPUs;\n"
                              "the goal is ≤ 36 s, the tolerance < 0.01 %; torch 2.13.0, sm_90, rank-64.\n\n"
                              "```\n7.59 s\n```\n") == []


def test_a_missing_result_file_is_reported(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"[gone]({os.path.relpath(claims.RESULTS / 'nvidia-h200' / 'nothing.json', tmp_path)}): 1 s\n")
    out = claims.check_file(doc)
    assert any("link to a missing result file" in o for o in out), out


def test_cli_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.md"
    bad.write_text("It takes 3.5 s.\n")
    assert claims.main([str(bad)]) == 1
    assert "bad.md:1: 3.5 s: no source" in capsys.readouterr().out
    good = tmp_path / "good.md"
    good.write_text("Nothing measured here: 80 frames.\n")
    assert claims.main([str(good)]) == 0
    assert claims.main([str(tmp_path / "absent.md")]) == 2
