"""scripts/mutation.py's bookkeeping of equivalent mutants: an entry counts only while its function's
source is the one it was judged at, and --pin records that source's hash."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO


def _script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mutation_script", REPO / "scripts" / "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EQUIVALENT", tmp_path / "equivalent.txt")
    meta = tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"hash_by_function_name": {"xǁAǁf": "aaa111", "x_g": "bbb222"}}))
    return module


def test_equivalents_count_only_at_the_source_they_were_judged_at(tmp_path, monkeypatch):
    script = _script(tmp_path, monkeypatch)
    f, g = "outlier_hydra.stages.demo.xǁAǁf", "outlier_hydra.stages.demo.x_g"
    script.EQUIVALENT.write_text(
        "# a comment\n"
        f"{f}__mutmut_1 @aaa111 judged at this source\n"
        f"{f}__mutmut_2 @000000 gpu: judged at an older source\n"
        f"{g}__mutmut_3 not pinned yet\n"
    )
    assert script.equivalents() == {f"{f}__mutmut_1": "judged at this source"}
    script.pin([f"{g}__mutmut_3"])
    assert script.equivalents() == {f"{f}__mutmut_1": "judged at this source", f"{g}__mutmut_3": "not pinned yet"}
    assert script.EQUIVALENT.read_text().splitlines() == [
        "# a comment",
        f"{f}__mutmut_1 @aaa111 judged at this source",
        f"{f}__mutmut_2 @000000 gpu: judged at an older source",
        f"{g}__mutmut_3 @bbb222 not pinned yet",
    ]
    script.pin([])
    assert script.equivalents()[f"{f}__mutmut_2"] == "gpu: judged at an older source"


def _stats(tmp_path, selection_hash: str) -> dict:
    stats = {"config_fingerprint": {"test_execution": "e", "test_selection": selection_hash}, "duration_by_test": {"t": 1.0}}
    (tmp_path / "mutants" / "mutmut-stats.json").write_text(json.dumps(stats))
    return stats


def _selection(tmp_path, files: list[str]) -> None:
    listed = ", ".join(f'"{f}"' for f in files)
    (tmp_path / "pyproject.toml").write_text(f"[tool.mutmut]\npytest_add_cli_args_test_selection = [{listed}]\n")


def test_test_files_can_join_the_selection_without_discarding_verdicts(tmp_path, monkeypatch):
    """mutmut resets every verdict when its selection's hash changes; adding files needs no reset (a
    killed mutant stays killed with more tests, survivors run again), so the script moves the hash;
    removing a file must still reset."""
    import hashlib

    script = _script(tmp_path, monkeypatch)
    before = ["tests/a.py", "tests/b.py"]
    digest = hashlib.sha256(repr(tuple(before)).encode()).hexdigest()[:12]  # mutmut's own hash
    _stats(tmp_path, digest)
    _selection(tmp_path, before)
    script.keep_verdicts_of_grown_selection()  # records what mutmut ran with
    stored = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert stored["config_fingerprint"]["test_selection"] == digest

    grown = ["tests/c.py", *before]
    _selection(tmp_path, grown)
    script.keep_verdicts_of_grown_selection()
    stored = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert stored["config_fingerprint"] == {
        "test_execution": "e",
        "test_selection": hashlib.sha256(repr(tuple(grown)).encode()).hexdigest()[:12],
    }
    assert stored["duration_by_test"] == {"t": 1.0}

    _selection(tmp_path, ["tests/c.py", "tests/a.py"])  # b.py left: its kills may not hold
    script.keep_verdicts_of_grown_selection()
    stored = json.loads((tmp_path / "mutants" / "mutmut-stats.json").read_text())
    assert stored["config_fingerprint"]["test_selection"] == hashlib.sha256(repr(tuple(grown)).encode()).hexdigest()[:12]


def test_functions_added_since_the_last_mapping_make_mutmut_map_the_tests_again(tmp_path, monkeypatch):
    """mutmut never maps a test it has seen to a function added later (its mutants all read "no
    tests"); the script removes mutmut's mapping then, once per new function, keeping the verdicts."""
    script = _script(tmp_path, monkeypatch)
    f, g = "outlier_hydra.stages.demo.xǁAǁf", "outlier_hydra.stages.demo.x_g"
    stats_path = tmp_path / "mutants" / "mutmut-stats.json"
    verdicts = (tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta").read_text()

    stats_path.write_text(json.dumps({"tests_by_mangled_function_name": {f: ["tests/t.py::a"]}}))
    script.map_new_functions()  # g appeared: no test maps to it yet
    assert not stats_path.exists()
    assert (tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta").read_text() == verdicts
    assert json.loads((tmp_path / "mutants" / "mapped.json").read_text()) == sorted([f, g])

    stats_path.write_text(json.dumps({"tests_by_mangled_function_name": {f: ["tests/t.py::a"]}}))
    script.map_new_functions()  # g was in that mapping and no test reaches it: no new mapping
    assert stats_path.exists()


def test_verdicts_travel_in_the_committed_file_for_unchanged_functions_only(tmp_path, monkeypatch):
    """mutants/ stays on the machine that ran it; tests/mutation_verdicts.json carries each judged
    mutant's exit code with its function's hash, and a fresh clone takes a verdict only where the
    function's source (its hash) and mutmut's version are the ones it was judged with."""
    script = _script(tmp_path, monkeypatch)
    monkeypatch.setattr(script, "VERDICTS", tmp_path / "verdicts.json")
    monkeypatch.setattr(script, "mutmut_version", lambda: "3.8.1")
    meta = tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta"
    f, g = "outlier_hydra.stages.demo.xǁAǁf", "outlier_hydra.stages.demo.x_g"

    def write_meta(codes: dict, g_hash: str) -> None:
        meta.write_text(
            json.dumps({"exit_code_by_key": codes, "hash_by_function_name": {"xǁAǁf": "aaa111", "x_g": g_hash}}, indent=4)
        )

    judged = {f"{f}__mutmut_1": 1, f"{f}__mutmut_2": 1, f"{f}__mutmut_3": 0, f"{f}__mutmut_4": None}
    judged |= {f"{f}__mutmut_5": 36, f"{f}__mutmut_7": 1, f"{g}__mutmut_1": None, f"{g}__mutmut_2": 33}
    write_meta(judged, "bbb222")
    assert script.save_verdicts() == 6
    ledger = json.loads(script.VERDICTS.read_text())
    assert ledger == {
        "mutmut": "3.8.1",
        "functions": {
            f: {"hash": "aaa111", "exit_codes": {"0": "3", "1": "1-2,7", "36": "5"}},
            g: {"hash": "bbb222", "exit_codes": {"33": "2"}},
        },
    }
    lines = script.VERDICTS.read_text().splitlines()
    assert [line.split('"')[1] for line in lines if "exit_codes" in line] == [g, f]  # one line per function

    # a fresh clone: mutmut made the same mutants, none judged; g's source has changed since
    fresh = {name: None for name in [*judged, f"{f}__mutmut_6"]}
    write_meta(fresh, "ccc333")
    assert script.seed_verdicts() == 5
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes == {
        **fresh,
        f"{f}__mutmut_1": 1,
        f"{f}__mutmut_2": 1,
        f"{f}__mutmut_3": 0,
        f"{f}__mutmut_5": 36,
        f"{f}__mutmut_7": 1,
    }
    meta.write_text(meta.read_text().replace("\n", "\r\n"))  # a mark: a rewrite would take it away
    assert script.seed_verdicts() == 0  # judged mutants are left as they are, and the file unwritten
    assert b"\r\n" in meta.read_bytes()

    write_meta(fresh, "bbb222")
    monkeypatch.setattr(script, "mutmut_version", lambda: "3.9.0")  # it may number mutants otherwise
    assert script.seed_verdicts() == 0
    assert json.loads(meta.read_text())["exit_code_by_key"] == fresh


def test_verdict_ranges_round_trip(tmp_path, monkeypatch):
    script = _script(tmp_path, monkeypatch)
    assert script._ranges([9, 1, 2, 3, 7, 10]) == "1-3,7,9-10"
    assert script._ranges([4]) == "4"
    for numbers in ([1], [1, 3], [2, 3, 4, 5], [1, 2, 4, 5, 6, 8, 10, 11]):
        assert script._numbers(script._ranges(numbers)) == numbers


def test_each_mutants_tests_run_file_by_file_cheapest_first():
    """scripts/mutmut_ordered.py: the same tests, the files whose tests take least first, each file's
    tests shortest first and together (a module's fixtures made once); unknown durations last."""
    spec = importlib.util.spec_from_file_location("mutmut_ordered", REPO / "scripts" / "mutmut_ordered.py")
    assert spec is not None and spec.loader is not None
    ordered = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ordered)
    seconds = {"tests/a.py::x": 5.0, "tests/a.py::y": 0.5, "tests/b.py::z": 2.0, "tests/b.py::w": 1.0}
    seconds |= {"tests/c.py::v": 0.1}
    tests = ["tests/a.py::x", "tests/b.py::z", "tests/c.py::u", "tests/a.py::y", "tests/b.py::w", "tests/c.py::v"]
    assert ordered.cheapest_first(tests, seconds) == [
        "tests/b.py::w",  # b: 3 s in all
        "tests/b.py::z",
        "tests/a.py::y",  # a: 5.5 s
        "tests/a.py::x",
        "tests/c.py::v",  # c holds a test of no recorded time
        "tests/c.py::u",
    ]
    assert ordered.cheapest_first([], seconds) == []
    # the tests that killed other mutants of the function first, most kills first
    killers = ordered.Counter({"tests/c.py::u": 1, "tests/a.py::x": 3, "tests/z.py::gone": 9})
    assert ordered.cheapest_first(tests, seconds, killers) == [
        "tests/a.py::x",
        "tests/c.py::u",
        "tests/c.py::v",  # the rest as before: c now 0.1 s, a 0.5 s, b 3 s
        "tests/a.py::y",
        "tests/b.py::w",
        "tests/b.py::z",
    ]


def test_the_tests_that_kill_a_functions_mutants_are_recorded_and_read_back(tmp_path):
    """scripts/mutmut_ordered.py's pytest plugin appends each failing test with the mutant's function;
    killers_of counts them for that function only."""
    spec = importlib.util.spec_from_file_location("mutmut_ordered", REPO / "scripts" / "mutmut_ordered.py")
    assert spec is not None and spec.loader is not None
    ordered = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ordered)
    log = tmp_path / "killers.log"
    f = ordered.function_of("outlier_hydra.stages.demo.xǁAǁf__mutmut_12")
    assert f == "outlier_hydra.stages.demo.xǁAǁf"

    class Report:
        def __init__(self, nodeid, failed):
            self.nodeid, self.failed = nodeid, failed

    for function, nodeid, failed in [
        (f, "t.py::a", True),
        (f, "t.py::b", False),
        (f, "t.py::a", True),
        ("g", "t.py::c", True),
    ]:
        ordered.RecordKills(function, log).pytest_runtest_logreport(Report(nodeid, failed))
    ordered.RecordKills("", log).pytest_runtest_logreport(Report("t.py::d", True))  # the clean run: nothing
    assert ordered.killers_of(f, log) == {"t.py::a": 2}
    assert ordered.killers_of("g", log) == {"t.py::c": 1}
    assert ordered.killers_of("", log) == {} and ordered.killers_of(f, tmp_path / "none.log") == {}


def test_a_fresh_clone_makes_the_mutants_takes_the_committed_verdicts_and_runs_the_rest(tmp_path, monkeypatch):
    """The whole run() with mutmut stood in for: the first step (mutants made, tests mapped) counts by
    the files it leaves, although mutmut 3.8 exits non-zero after it (no mutant matches the name it is
    given); the committed verdicts of unchanged functions are taken, only the others run, and every
    verdict is written back; the functions that first mapping saw are recorded (no needless remapping)."""
    import subprocess

    script = _script(tmp_path, monkeypatch)
    monkeypatch.setattr(script, "VERDICTS", tmp_path / "verdicts.json")
    monkeypatch.setattr(script, "mutmut_version", lambda: "3.8.1")
    meta = tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta"
    meta.unlink()
    f, g = "outlier_hydra.stages.demo.xǁAǁf", "outlier_hydra.stages.demo.x_g"
    names = [f"{f}__mutmut_1", f"{f}__mutmut_2", f"{g}__mutmut_1"]
    script.VERDICTS.write_text(
        json.dumps({"mutmut": "3.8.1", "functions": {f: {"hash": "aaa111", "exit_codes": {"1": "1-2"}}}})
    )
    runs = []

    def fake_mutmut(*args):
        out = ""
        if args[0] == "results" and meta.exists():
            status = {None: "not checked", 1: "killed", 0: "survived"}
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            out = "".join(f"    {n}: {status[c]}\n" for n, c in codes.items())
        elif args[:2] == ("run", "outlier_hydra.no_such_function*"):
            meta.write_text(
                json.dumps(
                    {"exit_code_by_key": dict.fromkeys(names), "hash_by_function_name": {"xǁAǁf": "aaa111", "x_g": "bbb222"}}
                )
            )
            (tmp_path / "mutants" / "mutmut-stats.json").write_text(
                json.dumps({"tests_by_mangled_function_name": {f: ["t"]}})
            )
            return subprocess.CompletedProcess(
                args, 1, "", "AssertionError: Filtered for specific mutants, but nothing matches"
            )
        elif args[0] == "run":
            runs.append(args[1:])
            data = json.loads(meta.read_text())
            data["exit_code_by_key"].update(dict.fromkeys(args[1:], 1))
            meta.write_text(json.dumps(data))
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(script, "mutmut", fake_mutmut)
    script.run(["stages"], None)
    assert runs == [(f"{g}__mutmut_1",)]  # f's two verdicts came from the committed file
    ledger = json.loads(script.VERDICTS.read_text())["functions"]
    assert ledger == {f: {"hash": "aaa111", "exit_codes": {"1": "1-2"}}, g: {"hash": "bbb222", "exit_codes": {"1": "1"}}}
    assert json.loads((tmp_path / "mutants" / "mapped.json").read_text()) == sorted([f, g])

    # --survivors: after tests were added, only the mutants not killed run again, not the unjudged
    data = json.loads(meta.read_text())
    data["exit_code_by_key"].update({f"{f}__mutmut_2": 0, f"{g}__mutmut_1": None})
    meta.write_text(json.dumps(data))
    runs.clear()
    _selection(tmp_path, ["tests/t.py"])
    script.run(["stages"], None, survivors=True)
    assert runs == [(f"{f}__mutmut_2",)]

    # --sample: of the mutants to judge, only those in the uniform sample
    data["exit_code_by_key"] = dict.fromkeys(data["exit_code_by_key"])
    meta.write_text(json.dumps(data))
    runs.clear()
    monkeypatch.setattr(script, "in_sample", lambda name: name.endswith("_2"))
    script.run(["stages"], None, fresh=True, sample=True)
    assert runs == [(f"{f}__mutmut_2",)]

    # --functions: only the mutants of the functions the patterns name (after a change to them)
    runs.clear()
    script.run(["stages"], None, fresh=True, functions=["*.x_g"])
    assert runs == [(f"{g}__mutmut_1",)]
    runs.clear()
    script.run(["stages"], None, fresh=True, functions=["*demo.x*A*f", "*nothing*"])
    assert runs == [(f"{f}__mutmut_1",)]  # its second was judged by the --sample run above


def test_a_mutant_whose_tests_process_aborts_counts_as_found(tmp_path, monkeypatch, capsys):
    """mutmut reports a SIGABRT exit as "suspicious"; the score counts it as killed, as a segfault."""
    import subprocess

    script = _script(tmp_path, monkeypatch)
    meta = tmp_path / "mutants" / "outlier_hydra" / "stages" / "demo.py.meta"
    f = "outlier_hydra.stages.demo.x_g"
    codes = {f"{f}__mutmut_1": -6, f"{f}__mutmut_2": 134, f"{f}__mutmut_3": 77, f"{f}__mutmut_4": 1}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": {"x_g": "bbb222"}}))
    assert script.aborted() == {f"{f}__mutmut_1", f"{f}__mutmut_2"}
    status = {-6: "suspicious", 134: "suspicious", 77: "suspicious", 1: "killed"}
    out = "".join(f"    {n}: {status[c]}\n" for n, c in codes.items())
    monkeypatch.setattr(script, "mutmut", lambda *a: subprocess.CompletedProcess(a, 0, out, ""))
    assert script.report(["stages"]) == 75.0  # 3 of 4: the third is suspicious for another reason
    assert f"suspicious  {f}__mutmut_3" in capsys.readouterr().out


def test_the_uniform_sample_is_a_tenth_by_name_and_reported_with_its_interval(tmp_path, monkeypatch, capsys):
    """One mutant in 10 by its name's hash: the same names on every machine, about a tenth of any
    set; the report gives the sample's score with its 95% Wilson interval (50 of 100: 40.4-59.6%)
    and counts an unjudged survivor of the sample as not killed; --sample runs only the sample."""
    import hashlib
    import subprocess

    script = _script(tmp_path, monkeypatch)
    names = [f"outlier_hydra.stages.demo.x_g__mutmut_{i}" for i in range(1, 2001)]
    picked = [n for n in names if script.in_sample(n)]
    assert picked == [n for n in names if int(hashlib.sha256(n.encode()).hexdigest(), 16) % 10 == 0]
    assert 160 <= len(picked) <= 240  # binomial(2000, 0.1): 200 +- 5 sd
    assert [round(v, 1) for v in script.wilson(50, 100)] == [40.4, 59.6]
    lo, hi = script.wilson(10, 10)
    assert hi == pytest.approx(100.0) and round(lo, 1) == 72.2

    status = {n: "killed" for n in names}
    status |= {picked[0]: "survived", picked[1]: "not checked", picked[2]: "suspicious", names[0]: "survived"}
    out = "".join(f"    {n}: {st}\n" for n, st in status.items())
    calls = []

    def mutmut(*args):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(script, "mutmut", mutmut)
    monkeypatch.setattr(script, "stats_file", lambda: tmp_path / "mutants" / "stats.json")
    script.report(["stages"])
    k = len(picked) - 3
    lo, hi = script.wilson(k, len(picked) - 1)
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, x in enumerate(out) if x.startswith("uniform sample"))
    assert out[at + 1].startswith("stages ") and out[at + 2].startswith("all ")
    assert out[at + 1].partition(" ")[2].strip() == out[at + 2].partition(" ")[2].strip()  # one module: the same
    line = out[at + 2]
    assert f"{len(picked)} mutants, {k} killed of {len(picked) - 1} judged non-equivalent" in line
    assert f"1 not yet run: score {100 * k / (len(picked) - 1):.1f}% (95% interval {lo:.1f}-{hi:.1f}%)" in line


def test_a_packages_init_module_is_named_as_mutmut_names_its_mutants(tmp_path, monkeypatch):
    """mutmut names the mutants of stages/__init__.py outlier_hydra.stages.x_f__mutmut_N (no
    __init__): their function's hash, equivalents and committed verdicts must go by that name too."""
    script = _script(tmp_path, monkeypatch)
    monkeypatch.setattr(script, "VERDICTS", tmp_path / "verdicts.json")
    monkeypatch.setattr(script, "mutmut_version", lambda: "3.8.1")
    meta = tmp_path / "mutants" / "outlier_hydra" / "stages" / "__init__.py.meta"
    f = "outlier_hydra.stages.x_plain"
    judged = {f"{f}__mutmut_1": 1, f"{f}__mutmut_2": 0}
    meta.write_text(json.dumps({"exit_code_by_key": judged, "hash_by_function_name": {"x_plain": "ccc333"}}))
    assert script.function_hashes()[f] == "ccc333"
    script.EQUIVALENT.write_text(f"{f}__mutmut_2 not pinned yet\n")
    script.pin([])
    assert script.equivalents() == {f"{f}__mutmut_2": "not pinned yet"}
    assert script.save_verdicts() == 2
    assert json.loads(script.VERDICTS.read_text())["functions"] == {
        f: {"hash": "ccc333", "exit_codes": {"0": "2", "1": "1"}}
    }
    meta.write_text(json.dumps({"exit_code_by_key": dict.fromkeys(judged), "hash_by_function_name": {"x_plain": "ccc333"}}))
    assert script.seed_verdicts() == 2  # a fresh clone takes them back
    assert json.loads(meta.read_text())["exit_code_by_key"] == judged
