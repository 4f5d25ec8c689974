"""`make mutation`: mutmut over stats/, analysis/, collect/ and stages/, and the score.

    scripts/mutation.py                      run every module, then report
    scripts/mutation.py stats collect        only these (package folders under outlier_hydra/)
    scripts/mutation.py --limit 200          judge at most 200 mutants this time, then report
    scripts/mutation.py --report             report what mutants/ holds, run nothing
    scripts/mutation.py --sample             judge only the uniform sample (1 mutant in 10), then report
    scripts/mutation.py --functions '*_update*'  judge only these functions' mutants (fnmatch), then report

The mutants not yet judged, and the survivors (a test added since may kill them), run by name in
chunks, those of the functions with the cheapest tests first, so a run stopped at any point leaves
the most verdicts (one `mutmut run` over a whole package can stall for minutes on end).

mutmut (configured in pyproject.toml, [tool.mutmut]) copies the package to mutants/, and for each
mutant runs only the tests that reach the mutated function, from the fast test files listed there.
Its results stay in mutants/ (git-ignored): a second run checks only what changed.

mutants/ stays on the machine that ran it; the verdicts travel in tests/mutation_verdicts.json
(committed, like a lock file): per function, the hash of its source and mutmut's exit code for each
judged mutant. On a fresh clone the run copies them into the mutants mutmut has just made, for every
function whose source is still the one they were judged at, so only changed functions (and the
survivors) run again. A verdict is trusted as long as its function's source is unchanged, as mutmut
trusts its own mutants/; `--fresh` takes none from the file.

Score = killed / (mutants - equivalent - GPU-only), per module and in all. The whole run takes hours
on two cores, and the order above judges the cheapest functions first, so the score of the judged
is not the whole's. The report also gives the score of a uniform sample: the mutants whose name's
SHA-256 is 0 modulo 10, a tenth of every module picked independently of cost or verdict, with its 95%
Wilson interval: an estimate of the whole's score (random mutant sampling, as Acree 1980 and Wong &
Mathur 1995 studied it). A sampled survivor no one has judged equivalent counts as not killed, so the
estimate errs low. `--sample` judges that sample first. A mutant that no selected
test reaches ("no tests") counts as not killed. Equivalent mutants (the program's behaviour is the
same) are listed in tests/mutation_equivalent.txt, one per line: the mutant's name, @ and the hash of
its function's source it was judged at (`--pin` writes it), then why; a reason starting "gpu:" marks
code only a CUDA device runs (counted in its own column). A mutant's name is its place in its
function, so once the function changes the entry no longer counts: the mutant runs again, and a
person judges it again (`mutmut show NAME`) before pinning it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # imported by path (the tests), not run
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutmut_ordered import function_of  # mutant name -> its function (one helper for both scripts)

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("stats", "analysis", "collect", "stages")
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
VERDICTS = ROOT / "tests" / "mutation_verdicts.json"
TARGET = 90.0
CHUNK = 400  # mutants per `mutmut run`: each run first lists the tests and runs them clean (1-3 minutes)
TO_RUN = ("not checked", "survived", "no tests", "suspicious")
SAMPLE_EVERY = 10  # the uniform sample: one mutant in this many, by the hash of its name


def stats_file() -> Path:
    """mutmut's mapping of tests to functions, their durations and its config fingerprint."""
    return ROOT / "mutants" / "mutmut-stats.json"


def mapped_file() -> Path:
    """The functions the last full mapping of tests saw (map_new_functions)."""
    return ROOT / "mutants" / "mapped.json"


def mutmut(*args: str) -> subprocess.CompletedProcess:
    """mutmut's command line (through scripts/mutmut_ordered.py: each mutant's tests cheapest first)."""
    # TRITON_INTERPRET: the Triton kernels' tests run in its interpreter, which must be on before
    # anything imports triton (mutmut imports the package before the tests' conftest can set it)
    # OMP_NUM_THREADS: mutmut runs one test process per core; torch's threads in each would contend.
    # OUTLIER_HYDRA_CACHE: mutants of the C++ build step build and load libraries of other names and
    # flags; they do it in mutants/, not in the cache the project's runs load from.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "OUTLIER_HYDRA_CACHE": str(ROOT / "mutants" / "cache"),
    }
    command = [sys.executable, str(Path(__file__).with_name("mutmut_ordered.py")), *args]
    return subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=args[0] == "results")


def listed_equivalents() -> dict[str, tuple[str | None, str]]:
    """tests/mutation_equivalent.txt: name -> (the function's hash it was judged at, the reason)."""
    out = {}
    if EQUIVALENT.is_file():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, rest = line.strip().partition(" ")
                pin, _, why = rest.partition(" ") if rest.startswith("@") else ("", "", rest)
                if not why.strip():
                    sys.exit(f"{EQUIVALENT.name}: {name} has no reason")
                out[name] = (pin[1:] or None, why.strip())
    return out


def _meta_files() -> list[tuple[str, Path]]:
    """mutmut's .meta files (verdicts and function hashes) with the module each belongs to, named as
    mutmut names its mutants: a package's __init__.py is the package (outlier_hydra.stages.x_plain)."""
    root = ROOT / "mutants"
    out = []
    for meta in sorted(root.glob("outlier_hydra/**/*.py.meta")):
        parts = meta.relative_to(root).with_suffix("").with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), meta))
    return out


def function_hashes() -> dict[str, str]:
    """Per mutated function, the hash of its source when mutmut last made its mutants (mutmut's
    .meta files). A mutant's number is its place in its function: once the function changes, the
    same name can be another mutation."""
    out = {}
    for module, meta in _meta_files():
        for function, digest in json.loads(meta.read_text()).get("hash_by_function_name", {}).items():
            out[f"{module}.{function}"] = digest
    return out


def equivalents() -> dict[str, str]:
    """The listed equivalents that still hold: judged at the function's present source (a stale one
    is run again and reported, until it is judged again and pinned: --pin)."""
    hashes = function_hashes()
    out = {}
    for name, (pin, why) in listed_equivalents().items():
        if pin is not None and pin == hashes.get(function_of(name)):
            out[name] = why
    return out


def pin(names: list[str]) -> None:
    """Record, for these listed equivalents (all of them if none is named), the hash of the function
    they were judged at. Pin only what you have judged again (`mutmut show NAME`)."""
    hashes = function_hashes()
    listed = listed_equivalents()
    wanted = set(names) or set(listed)
    if unknown := sorted(wanted - set(listed)):
        sys.exit(f"not listed in {EQUIVALENT.name}: {', '.join(unknown)}")
    lines = []
    for line in EQUIVALENT.read_text().splitlines():
        name = line.strip().partition(" ")[0]
        if name in wanted and not line.startswith("#") and (digest := hashes.get(function_of(name))):
            lines.append(f"{name} @{digest} {listed[name][1]}")
        else:
            lines.append(line)
    EQUIVALENT.write_text("\n".join(lines) + "\n")


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3,7,9-10"."""
    out, numbers = [], sorted(numbers)
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def _numbers(ranges: str) -> list[int]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def save_verdicts() -> int:
    """Write every judged mutant's exit code, with its function's hash, to tests/mutation_verdicts.json
    (one line per function, so a rerun's change reads as a diff of the functions that changed)."""
    functions: dict[str, dict] = {}
    for module, meta in _meta_files():
        data = json.loads(meta.read_text())
        by_function: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for name, code in data.get("exit_code_by_key", {}).items():
            if code is not None:
                by_function[function_of(name)][code].append(int(name.rpartition("__mutmut_")[2]))
        for function, codes in by_function.items():
            digest = data.get("hash_by_function_name", {}).get(function.removeprefix(module + "."))
            if digest is not None:
                functions[function] = {"hash": digest, "exit_codes": {str(c): _ranges(n) for c, n in sorted(codes.items())}}
    lines = [f"  {json.dumps(f, ensure_ascii=False)}: {json.dumps(v)}" for f, v in sorted(functions.items())]
    VERDICTS.write_text(
        f'{{\n "mutmut": {json.dumps(mutmut_version())},\n "functions": {{\n' + ",\n".join(lines) + "\n }\n}\n"
    )
    return sum(len(_numbers(r)) for v in functions.values() for r in v["exit_codes"].values())


def seed_verdicts() -> int:
    """Give the mutants mutmut has not judged here the committed verdict, where their function's source
    is the one it was judged at (and mutmut the same version: its numbering of mutants may change)."""
    if not VERDICTS.is_file():
        return 0
    ledger = json.loads(VERDICTS.read_text())
    if ledger.get("mutmut") != mutmut_version():
        print(f"{VERDICTS.name} was written by mutmut {ledger.get('mutmut')}: every mutant runs", flush=True)
        return 0
    seeded = 0
    for module, meta in _meta_files():
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        before = seeded
        for function, digest in data.get("hash_by_function_name", {}).items():
            known = ledger["functions"].get(f"{module}.{function}")
            if known is None or known["hash"] != digest:
                continue
            for code, ranges in known["exit_codes"].items():
                for number in _numbers(ranges):
                    name = f"{module}.{function}__mutmut_{number}"
                    if name in codes and codes[name] is None:
                        codes[name] = int(code)
                        seeded += 1
        if seeded > before:  # only the files it changed
            meta.write_text(json.dumps(data, indent=4))
    return seeded


def statuses() -> dict[str, str]:
    res = mutmut("results", "--all", "true")
    out = {}
    for line in res.stdout.splitlines():
        name, sep, st = line.strip().rpartition(": ")
        if sep and name.startswith("outlier_hydra."):
            out[name] = st.strip()
    return out


def test_seconds() -> dict[str, float]:
    """Per mutated function, the seconds of the tests mutmut runs for it (mutmut's own stats file)."""
    path = stats_file()
    if not path.is_file():
        return {}
    stats = json.loads(path.read_text())
    durations = stats.get("duration_by_test", {})
    return {
        f: sum(durations.get(t, 0.0) for t in tests) for f, tests in stats.get("tests_by_mangled_function_name", {}).items()
    }


def _fingerprint(values: list[str]) -> str:
    """mutmut's hash of a config list (mutmut.configuration.Config.config_fingerprint)."""
    return hashlib.sha256(repr(tuple(values)).encode()).hexdigest()[:12]


def keep_verdicts_of_grown_selection() -> None:
    """Let test files join [tool.mutmut]'s selection without discarding every verdict.

    mutmut discards all stored results when the selection's hash changes. When files were only added,
    that is needless: a mutant a test killed stays killed with more tests, the survivors run again
    anyway (TO_RUN), and mutmut maps the new files' tests to functions as new tests. So when the
    selection mutmut last ran with (recorded in mutants/selection.json) is a subset of the present
    one, its stored hash is moved to the present one's. A removed file still resets."""
    stats_path, record = stats_file(), ROOT / "mutants" / "selection.json"
    if not stats_path.is_file():
        return
    try:
        from tomllib import loads
    except ImportError:  # Python 3.10: mutmut depends on toml there
        from toml import loads  # type: ignore[no-redef]
    selection = loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    stats = json.loads(stats_path.read_text())
    stored = stats.get("config_fingerprint", {}).get("test_selection")
    before = json.loads(record.read_text()) if record.is_file() else None
    if stored != _fingerprint(selection) and before is not None and stored == _fingerprint(before):
        if set(before) <= set(selection):
            added = ", ".join(sorted(set(selection) - set(before)))
            print(f"tests added to the selection ({added}): the stored verdicts stay", flush=True)
            stats["config_fingerprint"]["test_selection"] = _fingerprint(selection)
            stats_path.write_text(json.dumps(stats, indent=4))
        else:
            print("the test selection lost files: mutmut judges every mutant again", flush=True)
    record.write_text(json.dumps(selection))


def map_new_functions() -> None:
    """Have mutmut map the tests to functions again when functions appeared since it last did.

    mutmut runs only new *tests* to map them; a test it has already seen is never mapped to a function
    added later (a method split in two: every mutant of the new part is "no tests"). Its mapping
    (mutants/mutmut-stats.json) is made again from all tests when that file is gone; the verdicts live
    elsewhere (the .meta files) and stay. mutants/mapped.json records the functions the last full
    mapping saw, so a function no test reaches does not cause a new mapping every run."""
    stats_path, record = stats_file(), mapped_file()
    functions = set(function_hashes())
    if not stats_path.is_file() or not functions:
        return
    mapped = set(json.loads(stats_path.read_text()).get("tests_by_mangled_function_name", {}))
    seen = set(json.loads(record.read_text())) if record.is_file() else mapped
    if new := sorted(functions - mapped - seen):
        print(
            f"{len(new)} functions no test was mapped to since the last mapping (e.g. {new[0]}): mapping again", flush=True
        )
        stats_path.unlink()
        seen = functions
    record.write_text(json.dumps(sorted(seen | mapped)))


def run(
    modules: list[str],
    limit: int | None,
    fresh: bool = False,
    survivors: bool = False,
    sample: bool = False,
    functions: list[str] | None = None,
) -> None:
    keep_verdicts_of_grown_selection()
    map_new_functions()
    status = statuses()
    # first run, or the mapping removed: mutmut makes the mutants and maps the tests, before the
    # mutants are ordered by their tests' time. No mutant matches the name, which mutmut 3.8 reports
    # as a failure (an assertion) after it has done both: what counts is that they are there.
    if not status or not stats_file().is_file():
        mutmut("run", "outlier_hydra.no_such_function*")
        if not stats_file().is_file() or not function_hashes():
            sys.exit("mutmut run failed (making the mutants and mapping the tests: run `mutmut run` to see why)")
        mapped_file().write_text(json.dumps(sorted(function_hashes())))  # all just mapped
    if not fresh and (seeded := seed_verdicts()):
        print(f"{seeded} verdicts taken from {VERDICTS.name} (their functions are unchanged)", flush=True)
    status = statuses()
    equiv = equivalents()
    wanted = [st for st in TO_RUN if st != "not checked"] if survivors else TO_RUN
    todo = [n for n, st in status.items() if module_of(n) in modules and st in wanted and n not in equiv]
    todo = [n for n in todo if in_sample(n)] if sample else todo
    todo = [n for n in todo if of_functions(n, functions)] if functions else todo
    seconds = test_seconds()
    todo.sort(key=lambda n: (seconds.get(function_of(n), 0.0), n))
    todo = todo[:limit] if limit is not None else todo
    print(f"{len(todo)} mutants to judge", flush=True)
    for i in range(0, len(todo), CHUNK):
        part = todo[i : i + CHUNK]
        if mutmut("run", *part).returncode != 0:
            sys.exit(f"mutmut run failed (mutants {i + 1}-{i + len(part)})")
        save_verdicts()
        print(f"{i + len(part)}/{len(todo)} judged", flush=True)


def of_functions(name: str, patterns: list[str]) -> bool:
    """Whether the mutant belongs to a function that one of the patterns (fnmatch, on the function's
    full name as mutmut writes it: outlier_hydra.stages.experts.xǁExpertsǁ_update) matches."""
    return any(fnmatch.fnmatchcase(function_of(name), p) for p in patterns)


def aborted() -> set[str]:
    """Mutants whose tests' process aborted (SIGABRT: exit code -6, or 134 from a shell); mutmut calls
    them "suspicious", but like a segfault the crash is the mutant found (e.g. torch told to import
    the C++ kernel's library of ops as a Python module aborts the process)."""
    return {
        name
        for _, meta in _meta_files()
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items()
        if code in (-6, 134)
    }


def in_sample(name: str) -> bool:
    """Whether a mutant is in the uniform sample: its name's SHA-256 modulo SAMPLE_EVERY is 0 (stable
    across machines and runs, blind to cost and verdict)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % SAMPLE_EVERY == 0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n, in percent."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return 100.0 * (centre - half), 100.0 * (centre + half)


def _found(c: Counter) -> int:
    """Mutants a test found: killed, timed out, caught by the type check, or crashing the tests'
    process (a segfault or an abort is found as surely as a failing test)."""
    return c["killed"] + c["timeout"] + c["caught by type check"] + c["segfault"]


def module_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "outlier_hydra" else "?"


def report(modules: list[str]) -> float:
    status = statuses()
    if not status:
        sys.exit("no mutmut results in mutants/: run `make mutation` first")
    equiv, listed = equivalents(), set(listed_equivalents())
    for name in sorted(listed - set(status)):
        print(f"note: {EQUIVALENT.name} lists {name}, which mutmut no longer makes")
    for name in sorted(listed - set(equiv)):
        print(f"note: {EQUIVALENT.name} lists {name}, judged at another version of its function: run again")
    counts: dict[str, Counter] = defaultdict(Counter)
    sampled: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    crashed = aborted()
    for name, st in status.items():
        mod = module_of(name)
        if mod not in modules:
            continue
        if st == "suspicious" and name in crashed:
            st = "segfault"
        if name in equiv:
            if st == "killed":
                print(f"note: {name} is listed as equivalent but a test kills it")
            st = "gpu only" if equiv[name].startswith("gpu:") else "equivalent"
        counts[mod][st] += 1
        if in_sample(name):
            sampled[mod][st] += 1
            sampled["all"][st] += 1
        if st in ("survived", "no tests", "suspicious"):
            survivors.append(f"{st:>10}  {name}")
    total: Counter = Counter()
    head = ("mutants", "killed", "timeout", "survived", "no tests", "equiv.", "gpu", "unrun", "score")
    print(f"\n{'module':<10} " + " ".join(f"{h:>8}" for h in head))
    for mod in [*modules, "all"]:
        c = total if mod == "all" else counts[mod]
        if mod != "all":
            total.update(c)
        n = sum(c.values())
        judged = n - c["equivalent"] - c["gpu only"] - c["not checked"] - c["skipped"]
        killed = _found(c)
        score = 100.0 * killed / judged if judged else float("nan")
        row = (
            n,
            c["killed"] + c["segfault"],
            c["timeout"],
            c["survived"] + c["suspicious"],
            c["no tests"],
            c["equivalent"],
            c["gpu only"],
        )
        print(f"{mod:<10} " + " ".join(f"{v:>8}" for v in (*row, c["not checked"])) + f" {score:>7.1f}%")
    print(f"\nuniform sample (1 mutant in {SAMPLE_EVERY}): the estimate of each module's whole score")
    for mod in [*modules, "all"]:
        c = sampled[mod]
        found = _found(c)
        judged = found + c["survived"] + c["suspicious"] + c["no tests"]
        lo, hi = wilson(found, judged)
        print(
            f"{mod:<10} {sum(c.values())} mutants, {found} killed of {judged} judged non-equivalent,"
            f" {c['equivalent'] + c['gpu only']} equivalent or GPU-only, {c['not checked']} not yet run:"
            f" score {100.0 * found / judged if judged else float('nan'):.1f}% (95% interval {lo:.1f}-{hi:.1f}%)"
        )
    if survivors:
        print(f"\nnot killed ({len(survivors)}; `.venv/bin/mutmut show NAME` prints the change):")
        print("\n".join(sorted(survivors)))
    return score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"package folders: {', '.join(MODULES)} (default: all four)")
    p.add_argument("--report", action="store_true", help="only report the results mutants/ holds")
    p.add_argument("--limit", type=int, default=None, help="judge at most this many mutants this time")
    p.add_argument("--survivors", action="store_true", help="judge again only the mutants not killed (after adding tests)")
    p.add_argument("--sample", action="store_true", help=f"judge only the uniform sample (1 mutant in {SAMPLE_EVERY})")
    p.add_argument(
        "--fresh", action="store_true", help=f"take no verdicts from {VERDICTS.name} (with no mutants/: judge all)"
    )
    p.add_argument(
        "--functions",
        nargs="+",
        metavar="PATTERN",
        help="judge only the mutants of the functions these fnmatch patterns name (after a change: *Experts*_update*)",
    )
    p.add_argument("--pin", nargs="*", metavar="NAME", help="record that these listed equivalents (default all) hold")
    args = p.parse_args()
    if args.pin is not None:
        pin(args.pin)
        return
    modules = args.modules or list(MODULES)
    if unknown := sorted(set(modules) - set(MODULES)):
        p.error(f"not a module mutation testing covers: {', '.join(unknown)} (choose from {', '.join(MODULES)})")
    if not args.report:
        run(modules, args.limit, args.fresh, args.survivors, args.sample, args.functions)
    score = report(modules)
    print(f"\nscore {score:.1f}% (target {TARGET:.0f}%)")


if __name__ == "__main__":
    main()
