"""The mutants of tests/mutants.py still apply: each one's text occurs once in its file, its tests exist.

The mutation run takes many minutes and is not part of the suite; a code change that moves a mutant's text
would otherwise be found only when the run stops at it (twice in one round). Checked here in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mutants import MUTANTS, PACKAGE, Mutant

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_applies(mutant: Mutant) -> None:
    assert (PACKAGE / mutant.file).read_text(encoding="utf-8").count(mutant.old) == 1
    assert mutant.old != mutant.new
    for test in mutant.tests:
        assert (TESTS / test.split("::", 1)[0]).is_file(), test


def test_mutant_ids_are_unique() -> None:
    ids = [m.id for m in MUTANTS]
    assert sorted(ids) == sorted(set(ids))
