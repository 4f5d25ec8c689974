"""mutmut's command line, with each mutant's tests run cheapest first (scripts/mutation.py runs this).

mutmut 3.8 passes a mutant's tests to pytest in the order of a Python set, and pytest stops at the
first failure (-x): a mutant the first test kills can still wait for a minute of slower tests before
it. Here the tests run file by file, the files whose selected tests take least first, each file's
tests shortest first (kept together, so a module's fixtures are made once). What is run is the same
set; only the order changes, so a verdict cannot: a mutant is killed when any of its tests fails."""

from __future__ import annotations

import math
from collections import defaultdict


def cheapest_first(tests: list[str], seconds: dict[str, float]) -> list[str]:
    """Node ids grouped by file, files by the sum of their tests' seconds, tests by their seconds."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for test in tests:
        by_file[test.partition("::")[0]].append(test)

    def cost(test: str) -> float:
        return seconds.get(test, math.inf)

    files = sorted(by_file, key=lambda f: (sum(cost(t) for t in by_file[f]), f))
    return [t for f in files for t in sorted(by_file[f], key=lambda t: (cost(t), t))]


def main() -> None:
    from mutmut.__main__ import cli, state
    from mutmut.runners.harness import PytestRunner

    regular_run = PytestRunner._pytest_args_regular_run

    def ordered(self, tests):
        return regular_run(self, cheapest_first(list(tests), state().duration_by_test) if tests else tests)

    PytestRunner._pytest_args_regular_run = ordered  # type: ignore[method-assign]
    cli()


if __name__ == "__main__":
    main()
