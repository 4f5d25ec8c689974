"""mutmut's command line, with each mutant's tests run in the order likeliest to kill it soonest
(scripts/mutation.py runs this).

mutmut 3.8 passes a mutant's tests to pytest in the order of a Python set, and pytest stops at the
first failure (-x): a mutant the first test kills can still wait for a minute of slower tests before
it. Here the tests that killed other mutants of the same function run first (most kills first: a
function's mutants mostly fall to the same few tests; recorded in mutants/killers.log as they fail),
then the rest file by file, the files whose selected tests take least first, each file's tests
shortest first (kept together, so a module's fixtures are made once). What is run is the same set;
only the order changes, so a verdict cannot: a mutant is killed when any of its tests fails."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path

KILLERS = Path("mutants") / "killers.log"  # "function<TAB>test node id" per failing test of a mutant


def cheapest_first(tests: list[str], seconds: dict[str, float], killers: Counter | None = None) -> list[str]:
    """Node ids: those in killers by their count (then their seconds); then the rest grouped by file,
    files by the sum of their tests' seconds, tests by their seconds."""

    def cost(test: str) -> float:
        return seconds.get(test, math.inf)

    killers = killers or Counter()
    first = sorted((t for t in tests if killers[t]), key=lambda t: (-killers[t], cost(t), t))
    by_file: dict[str, list[str]] = defaultdict(list)
    for test in tests:
        if not killers[test]:
            by_file[test.partition("::")[0]].append(test)
    files = sorted(by_file, key=lambda f: (sum(cost(t) for t in by_file[f]), f))
    return first + [t for f in files for t in sorted(by_file[f], key=lambda t: (cost(t), t))]


def function_of(mutant: str) -> str:
    return mutant.rpartition("__mutmut_")[0]


def killers_of(function: str, log: Path = KILLERS) -> Counter:
    """How often each test has killed a mutant of this function."""
    out: Counter = Counter()
    if function and log.is_file():
        for line in log.read_text().splitlines():
            name, _, test = line.partition("\t")
            if name == function and test:
                out[test] += 1
    return out


class RecordKills:
    """pytest plugin in a mutant's test process: appends the failing test to the log (one short line
    per write with O_APPEND, so the two test processes' lines do not interleave)."""

    def __init__(self, function: str, log: Path = KILLERS):
        self.function, self.log = function, log

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and self.function:
            with open(self.log, "a") as f:
                f.write(f"{self.function}\t{report.nodeid}\n")


def main() -> None:
    from mutmut.__main__ import cli, state
    from mutmut.runners.harness import PytestRunner

    regular_run, execute = PytestRunner._pytest_args_regular_run, PytestRunner.execute_pytest

    def mutant_function() -> str:
        # mutmut names the mutant under test here; "" for the clean run, other words for its own runs
        return function_of(os.environ.get("MUTANT_UNDER_TEST", ""))

    log = KILLERS.absolute()  # mutmut runs pytest inside mutants/

    def ordered(self, tests):
        if not tests:
            return regular_run(self, tests)
        killers = killers_of(mutant_function(), log)
        return regular_run(self, cheapest_first(list(tests), state().duration_by_test, killers))

    def recording(self, params, **kwargs):
        if function := mutant_function():
            kwargs["plugins"] = [*kwargs.get("plugins", []), RecordKills(function, log)]
        return execute(self, params, **kwargs)

    PytestRunner._pytest_args_regular_run = ordered  # type: ignore[method-assign]
    PytestRunner.execute_pytest = recording  # type: ignore[method-assign]
    cli()


if __name__ == "__main__":
    main()
