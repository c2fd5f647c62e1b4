"""Instruction counts of marked regions of a Python process, from valgrind's callgrind.

Instruction counts repeat almost exactly from run to run, unlike times on a shared machine. Python
cannot issue callgrind's client requests (``CALLGRIND_DUMP_STATS`` is inline assembly in
``valgrind/callgrind.h``), so the measured process marks its regions by calling a libc function
nothing else in it calls, ``getppid`` (``os.getppid()``), and callgrind runs with
``--dump-before=getppid``: each call writes the counts since the previous one to a numbered file
(``<out>.1``, ``<out>.2``, ...). Start-up and imports land in the first file; each region between
two marks in a file of its own. A region costs the same few hundred instructions of call overhead
each time; measuring a loop at two lengths and subtracting cancels it (see :func:`per_iteration`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

MARK_FUNCTION = "getppid"


def mark() -> None:
    """End the current region: callgrind dumps its counts (outside callgrind, a cheap system call)."""
    os.getppid()


def available() -> str | None:
    """Why callgrind cannot run here, or ``None`` if it can."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install valgrind)"
    return None


def command(out_file: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` under callgrind, a dump at each :func:`mark`; instruction counts only, no per-line data."""
    return [
        "valgrind",
        "--tool=callgrind",
        f"--dump-before={MARK_FUNCTION}",
        "--dump-instr=no",
        "--dump-line=no",
        f"--callgrind-out-file={out_file}",
        *argv,
    ]


def environment(layout: int = 0) -> dict[str, str]:
    """The child's environment: a fixed hash seed, so that dict and set layouts repeat run to run.

    ``layout`` > 0 pads the environment, which moves the process's stack and heap: the same code then
    counts up to 0.3 % more or fewer instructions, as CPython's type attribute cache and dict probes hit
    or collide at other addresses (``find_name_in_mro`` and ``_Py_dict_lookup`` in callgrind_annotate).
    """
    padding = {"OTEL_BGTASKS_BENCH_LAYOUT": "x" * (40 * layout)} if layout else {}
    return {**os.environ, "PYTHONHASHSEED": "0", **padding}


def dump_files(out_file: Path) -> list[Path]:
    """The numbered dumps of one run, in order: dump ``i`` holds the counts up to the ``i``-th mark."""
    numbered = [p for p in out_file.parent.glob(out_file.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(numbered, key=lambda p: int(p.suffix[1:]))


_TOTALS = re.compile(rb"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def instructions(dump: Path) -> int:
    """Instructions executed in one dump (its ``totals:`` line)."""
    found = _TOTALS.search(dump.read_bytes())
    if found is None:
        raise ValueError(f"{dump}: no totals line; is it a callgrind output file?")
    return int(found.group(1))


def regions(out_file: Path, marks: int) -> list[int]:
    """Instructions between consecutive marks: ``marks`` marks make ``marks - 1`` regions.

    A different number of dumps means something else called ``getppid`` and the regions cannot be
    told apart: that is an error, not a figure.
    """
    dumps = dump_files(out_file)
    if len(dumps) != marks:
        raise RuntimeError(
            f"{out_file}: expected {marks} dumps, found {len(dumps)}; "
            f"did something other than the benchmark call {MARK_FUNCTION}()?"
        )
    return [instructions(dump) for dump in dumps[1:]]


def per_iteration(once: int, twice: int, n: int) -> float:
    """Instructions per iteration from a region of ``n`` iterations and one of ``2n``: the difference
    cancels what every region costs once (the mark's own call, the loop's set-up)."""
    return (twice - once) / n


_NAMED = re.compile(r"^c?fn=\((\d+)\)(?: (.*))?$")


def calls(dump: Path, functions: Sequence[str]) -> dict[str, int]:
    """How many times each C function in ``functions`` was called in one dump, from its ``calls=`` lines.

    Python functions cannot be told apart here (to callgrind they are all the interpreter's
    ``_PyEval_EvalFrameDefault``); C functions can: the allocator, the garbage collector, the clock.
    """
    names: dict[str, str] = {}  # callgrind writes a function's name once per file, then only its id
    found = dict.fromkeys(functions, 0)
    callee = ""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("fn=", "cfn=")):
            match = _NAMED.match(line)
            if match is None:
                continue
            ident, name = match.groups()
            if name is not None:
                names[ident] = name.split("'")[0].split("@")[0]  # not recursion depth ('2), nor symbol version
            if line.startswith("cfn="):
                callee = names.get(ident, "")
        elif line.startswith("calls=") and callee in found:
            found[callee] += int(line.split()[0].removeprefix("calls="))
    return found
