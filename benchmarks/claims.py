"""``python -m benchmarks.claims [FILE ...]``: every measured number in the README and docs has a source.

Checks README.md and docs/*.md by default; exits 1 and prints ``file:line: claim: why`` for each number
without a source, 0 when every one has one.

What counts as a claim (a measured quantity):

- a number followed by a unit of measure: ``s ms µs min`` (time), ``×`` (a ratio; ``704×1024`` is a size),
  ``%``, ``GiB GB MiB MB KiB KB TB``, ``TFLOP/s TFLOPS PFLOP PFLOP/s TB/s GB/s``, ``W MHz GHz``, ``tokens/s``,
  ``dB``, ``grey levels``. Bare numbers chained to one by ``/``, ``+``, ``–`` or ``vs`` share its unit
  (``7.73 / 6.93 s``, ``9.98–10.35 s``, ``4.6 + 1.8 s``);
- a decimal number (``0.042``, ``8.7e-4``) in the clause after ``rel-L2`` / ``relative error``;
- in a table, a bare number in a column whose header names rel-L2 or an error, or in a column (not the first)
  where another cell carries a unit: the cell inherits it.

Not claims: text in code spans and code blocks (flags, settings, commands), link targets, plain counts,
versions and input sizes (no unit), and bounds: a number right after ``≤ < ≥ >`` (goals, limits, tolerances).

A claim has a source when one of these holds:

1. **a linked result**: the claim's paragraph (a list item counts as a paragraph) or table row -- for a row,
   also the paragraph right above the table -- links (relative Markdown link) to a file under
   ``benchmarks/results/`` that holds the number within its printed rounding (``7.59`` matches 7.585..7.595;
   ``~`` or ``≈`` in front widens that to 5 %). A ``.md`` link is read through the ``.json`` beside it, a
   ``.csv`` as text, a folder as every JSON in it. Unit scales are tried: a ``s`` claim matches seconds or
   milliseconds, ``%`` a percentage or a fraction, ``GB``/``GiB`` bytes, ``TFLOP/s``/``PFLOP`` FLOP counts;
2. **an external figure**: its line carries ``(external: SOURCE)`` with a URL or citation;
3. **derived**: the number is followed by ``(= EXPR)``, arithmetic (``+ − - × · * / ( )``) that gives the
   number within its printed rounding; every non-integer operand must itself be found in a linked result
   of the same paragraph or row (integers are counts: steps, forwards, frames).
"""
from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Longest first so that "TFLOP/s" is not read as "TFLOP" + "/s", "ms" not as "m" + "s".
UNITS = ["TFLOP/s", "TFLOPS", "PFLOP/s", "PFLOP", "tokens/s", "TB/s", "GB/s", "grey levels", "grey level",
         "GiB", "MiB", "KiB", "GB", "MB", "KB", "kB", "TB", "MHz", "GHz", "dB", "min", "ms", "µs", "s", "W", "%", "×"]
# How a number in a result file may be written for a claim in this unit: claim ≈ file value × scale.
SCALES: dict[str, tuple[float, ...]] = {
    "s": (1.0, 1e-3, 1e-6), "ms": (1.0, 1e3), "µs": (1.0, 1e6), "min": (1.0, 1 / 60),
    "%": (1.0, 100.0), "×": (1.0,),
    "GiB": (1.0, 2.0**-30), "MiB": (1.0, 2.0**-20), "KiB": (1.0, 2.0**-10),
    "GB": (1.0, 1e-9), "MB": (1.0, 1e-6), "KB": (1.0, 1e-3), "kB": (1.0, 1e-3), "TB": (1.0, 1e-12),
    "TFLOP/s": (1.0, 1e-12), "TFLOPS": (1.0, 1e-12), "PFLOP": (1.0, 1e-15), "PFLOP/s": (1.0, 1e-15),
    "TB/s": (1.0, 1e-12), "GB/s": (1.0, 1e-9),
}
OPERAND_SCALES = (1.0, 1e2, 1e-2, 1e3, 1e-3, 1e-6, 1e-9, 1e-12, 1e-15, 2.0**-30, 2.0**-20)

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-−+]?\d+)?"
# A number that is not part of a word, identifier, version or file name (sm_90, H200, 4.0.0b36, rank-64).
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])(?<![A-Za-z]-)(?P<approx>(?:[~≈]|about )\s?)?(?P<num>" + _NUM + r")(?![A-Za-z0-9_]|\.\d)")
UNIT = re.compile(r"\s?(?P<unit>" + "|".join(re.escape(u) for u in UNITS) + r")(?![A-Za-z0-9/])")
CHAIN = re.compile(r"(?:\s*[/+]\s*|\s*[–−]\s*|\s+vs\.?\s+|-)[−+-]?$")
BOUND = re.compile(r"[≤<≥>]\s?$")
RELL2 = re.compile(r"rel-?L2|relative error|rel_l2", re.IGNORECASE)
CLAUSE_END = re.compile(r"[;)|]|\.(?:\s|$)")
LINK = re.compile(r"\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
CODE = re.compile(r"`[^`]*`")
EXTERNAL = re.compile(r"\(external:\s*(?P<src>[^)]*\S)\s*\)")
DERIVED = re.compile(r"\(=\s*(?P<expr>[^()]*(?:\([^()]*\)[^()]*)*)\)")
TABLE_HEADER_METRIC = re.compile(r"rel-?L2|error", re.IGNORECASE)


@dataclass
class Claim:
    path: Path
    line: int
    text: str
    value: float
    tol: float
    unit: str
    external: bool = False
    expr: str | None = None


@dataclass
class Block:
    lines: list[tuple[int, str]]           # (line number, raw text)
    table: bool = False
    caption: list[Path] = field(default_factory=list)  # sources of the paragraph above a table


def blank(m: re.Match) -> str:
    return " " * len(m.group())


def printed_tolerance(num: str, approx: bool, value: float) -> float:
    """Half a unit of the last printed digit (``7.59`` → 0.005, ``8.7e-4`` → 5e-6); 5 % for ``~`` numbers."""
    mant, _, exp = num.replace(",", "").lower().partition("e")
    decimals = len(mant.partition(".")[2])
    tol = 0.5 * 10.0 ** (-decimals) * (10.0 ** float(exp.replace("−", "-")) if exp else 1.0)
    return max(tol, 0.05 * abs(value)) if approx else tol


def to_float(num: str) -> float:
    return float(num.replace(",", "").replace("−", "-"))


# ---- result files -------------------------------------------------------------------------------------------

_cache: dict[Path, list[float]] = {}


def _numbers_in(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers_in(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers_in(v)]
    return []


def result_numbers(path: Path) -> list[float]:
    """Every number a result holds: the numeric values of its JSON (meta included), or a CSV's numbers."""
    if path in _cache:
        return _cache[path]
    if path.is_dir():
        nums = [x for p in sorted(path.glob("*.json")) for x in result_numbers(p)]
    elif path.suffix == ".json":
        nums = _numbers_in(json.loads(path.read_text()))
    else:
        nums = [to_float(m.group("num")) for m in NUMBER.finditer(path.read_text())]
    _cache[path] = nums
    return nums


def resolve_link(doc: Path, target: str) -> Path | None | str:
    """The result file a link points at (``.md`` → its ``.json``), None if not a result link, or an error text."""
    if re.match(r"[a-z]+:", target):
        return None
    path = (doc.parent / target.split("#")[0]).resolve()
    try:
        path.relative_to(RESULTS)
    except ValueError:
        return None
    if not path.exists():
        return f"link to a missing result file {target}"
    if path.suffix == ".md" and path.with_suffix(".json").exists():
        return path.with_suffix(".json")
    return path


def found(value: float, tol: float, scales: tuple[float, ...], sources: list[Path]) -> bool:
    v = abs(value)
    return any(abs(abs(x) * s - v) <= tol * (1 + 1e-9) + 1e-15 for src in sources for x in result_numbers(src)
               for s in scales)


# ---- Markdown -----------------------------------------------------------------------------------------------

def blocks(text: str) -> list[Block]:
    """Paragraphs, list items, headings and tables, with their line numbers; code blocks left out."""
    out: list[Block] = []
    cur: Block | None = None
    fence = False
    for no, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("```"):
            fence, cur = not fence, None
            continue
        if fence or not raw.strip():
            cur = None
            continue
        is_table = raw.lstrip().startswith("|")
        starts_item = bool(re.match(r"\s*(?:[-*]|\d+\.)\s", raw)) or raw.startswith("#")
        if cur is None or cur.table != is_table or (starts_item and not is_table) or cur.lines[-1][1].startswith("#"):
            cur = Block([], table=is_table)
            out.append(cur)
        cur.lines.append((no, raw))
    return out


def clean(line: str) -> tuple[str, list[str]]:
    """The line without code spans, emphasis and link targets (link texts kept), and the link targets."""
    line = CODE.sub(blank, line)
    targets = [m.group("target") for m in LINK.finditer(line)]
    line = LINK.sub(lambda m: m.group("text"), line)
    return line.replace("**", "").replace("__", ""), targets


def _eval(expr: str) -> tuple[float, list[str]]:
    """Value of a ``(= ...)`` expression and its non-integer operands (as printed)."""
    src = expr.replace("×", "*").replace("·", "*").replace("−", "-").replace(",", "")
    if not re.fullmatch(r"[\d.eE+\-*/() ]+", src):
        raise ValueError(f"only numbers and + - × / ( ) are allowed in (= {expr})")
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
    operands: list[str] = []

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        raise ValueError(f"cannot evaluate (= {expr})")

    value = ev(ast.parse(src, mode="eval"))
    operands = [m.group() for m in re.finditer(r"\d+\.\d+(?:[eE][-+]?\d+)?", src)]
    return value, operands


def line_claims(path: Path, no: int, text: str) -> list[Claim]:
    """Claims of one cleaned line (or table cell); a derived one carries its ``(= ...)`` expression."""
    external = bool(EXTERNAL.search(text))
    text = EXTERNAL.sub(blank, text)
    claims: list[Claim] = []
    spans = [(m.start(), m.end(), m.group("expr")) for m in DERIVED.finditer(text)]
    for s, e, _ in spans:  # operands are not claims of their own
        text = text[:s] + "(" + " " * (e - s - 2) + ")" + text[e:]

    def add(m: re.Match, unit: str, end: int) -> Claim | None:
        if BOUND.search(text[:m.start()]):
            return None
        value = to_float(m.group("num"))
        c = Claim(path, no, m.group().strip() + ("" if unit in ("rel-L2",) else f" {unit}"), value,
                  printed_tolerance(m.group("num"), bool(m.group("approx")), value), unit, external)
        after = text[end:]
        for s, _, expr in spans:
            if s >= end and not after[: s - end].strip():
                c.expr = expr
        claims.append(c)
        return c

    taken: set[int] = set()
    for m in NUMBER.finditer(text):
        u = UNIT.match(text, m.end())
        if not u or (u.group("unit") == "×" and re.match(r"\s?\d", text[u.end():])):
            continue
        unit = u.group("unit")
        add(m, unit, u.end())
        taken.add(m.start())
        prefix_end = m.start() - (len(m.group("approx") or ""))
        while True:  # bare numbers chained in front share the unit
            ch = CHAIN.search(text[:prefix_end])
            if not ch:
                break
            prev = None
            for p in NUMBER.finditer(text[:ch.start()]):
                prev = p
            if prev is None or prev.end() != ch.start() or prev.start() in taken:
                break
            add(prev, unit, prev.end())
            taken.add(prev.start())
            prefix_end = prev.start() - (len(prev.group("approx") or ""))
    for k in RELL2.finditer(text):
        end = CLAUSE_END.search(text, k.end())
        clause_end = end.start() if end else len(text)
        for m in NUMBER.finditer(text, k.end(), clause_end):
            num = m.group("num")
            if m.start() in taken or not re.search(r"[.eE]", num) or UNIT.match(text, m.end()):
                continue
            add(m, "rel-L2", m.end())
            taken.add(m.start())
    return claims


def table_claims(path: Path, block: Block) -> list[tuple[Claim, list[str]]]:
    """Claims of a table with the links of their row: unit-bearing numbers, plus bare numbers whose column
    names a metric or carries a unit in another cell."""
    rows = []
    for no, raw in block.lines:
        cleaned, targets = clean(raw)
        cells = [c for c in cleaned.strip().strip("|").split("|")]
        rows.append((no, cells, targets))
    header = rows[0][1] if rows else []
    body = [r for r in rows[1:] if not re.fullmatch(r"[\s|:\-]*", "|".join(r[1]))]
    col_unit: dict[int, str] = {}
    for i, h in enumerate(header):
        if i > 0 and TABLE_HEADER_METRIC.search(h):
            col_unit[i] = "rel-L2"
    for _, cells, _ in body:
        for i, cell in enumerate(cells):
            if i == 0 or i in col_unit:
                continue
            for m in NUMBER.finditer(cell):
                u = UNIT.match(cell, m.end())
                if u and not (u.group("unit") == "×" and re.match(r"\s?\d", cell[u.end():])):
                    col_unit[i] = u.group("unit")
                    break
    out = []
    for no, cells, targets in [rows[0]] + body:
        external = bool(EXTERNAL.search("|".join(cells)))
        for i, cell in enumerate(cells):
            claims = line_claims(path, no, cell)
            if i in col_unit and no != rows[0][0] and not claims:  # a cell with its own units inherits none
                bare = DERIVED.sub(blank, EXTERNAL.sub(blank, cell))
                for m in NUMBER.finditer(bare):
                    if BOUND.search(bare[:m.start()]):
                        continue
                    if col_unit[i] == "rel-L2" and not re.search(r"[.eE]", m.group("num")):
                        continue
                    value = to_float(m.group("num"))
                    claims.append(Claim(path, no, f"{m.group().strip()} ({col_unit[i]})", value,
                                        printed_tolerance(m.group("num"), bool(m.group("approx")), value), col_unit[i]))
            for c in claims:
                c.external = c.external or external
                out.append((c, targets))
    return out


def check_file(path: Path) -> list[str]:
    """Problems of one Markdown file, each ``file:line: claim: why``."""
    problems: list[str] = []
    text = path.read_text()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    prev_sources: list[Path] = []
    prev_end = -10
    items: list[tuple[Claim, list[Path]]] = []
    for block in blocks(text):
        def sources_of(targets: list[str], no: int) -> list[Path]:
            found_paths = []
            for t in targets:
                r = resolve_link(path, t)
                if isinstance(r, str):
                    problems.append(f"{rel}:{no}: {r}")
                elif r is not None:
                    found_paths.append(r)
            return found_paths

        if block.table:
            caption = prev_sources if block.lines[0][0] - prev_end <= 2 else []
            for c, targets in table_claims(path, block):
                items.append((c, sources_of(targets, c.line) + caption))
            prev_sources, prev_end = [], block.lines[-1][0]
            continue
        para_targets: list[str] = []
        para_claims: list[Claim] = []
        for no, raw in block.lines:
            cleaned, targets = clean(raw)
            para_targets += targets
            para_claims += line_claims(path, no, cleaned)
        srcs = sources_of(para_targets, block.lines[0][0])
        items += [(c, srcs) for c in para_claims]
        prev_sources, prev_end = srcs, block.lines[-1][0]
    for c, srcs in items:
        where = f"{rel}:{c.line}: {c.text}"
        if c.external:
            continue
        if c.expr is not None:
            try:
                value, operands = _eval(c.expr)
            except (ValueError, SyntaxError, ZeroDivisionError) as e:
                problems.append(f"{where}: {e}")
                continue
            if abs(abs(value) - abs(c.value)) > c.tol * (1 + 1e-9):
                problems.append(f"{where}: (= {c.expr}) gives {value:.6g}, not {c.text}")
            for op in operands:
                v = to_float(op)
                if not found(v, printed_tolerance(op, False, v), OPERAND_SCALES, srcs):
                    problems.append(f"{where}: operand {op} of (= {c.expr}) is in no result file linked here")
            continue
        if not srcs:
            problems.append(f"{where}: no source (link a benchmarks/results file, mark it (external: SOURCE), "
                            f"or derive it (= ...))")
        elif not found(c.value, c.tol, SCALES.get(c.unit, (1.0,)), srcs):
            names = ", ".join(sorted({s.name for s in srcs}))
            problems.append(f"{where}: not in the linked result(s) {names}")
    return problems


def default_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    files = [p.resolve() for p in args.files] or default_files()
    problems: list[str] = []
    for f in files:
        if not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 2
        problems += check_file(f)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} number(s) without a source", file=sys.stderr)
        return 1
    print(f"every measured number in {len(files)} file(s) has a source")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
