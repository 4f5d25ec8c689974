"""The one-pass C++ reduction (collect/fused_cpu.cpp) against numpy, at its edges: every dtype, widths
that are and are not a multiple of its 16-wide vector step, NaN and +-Inf, values exactly at an edge,
equal magnitudes of both signs, more and fewer than k values per dim, one thread and two."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from outlier_hydra.collect import fused_cpu

EDGES = np.array([3.0, 4.0, 6.0, 8.0, 100.0], np.float32)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# the subprocesses import the package this process imported (under mutmut: its mutated copy, which
# the inherited MUTANT_UNDER_TEST switches), not whatever the environment's install points to
PACKAGE_ROOT = str(Path(fused_cpu.__file__).resolve().parents[2])


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])), **extra)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused_cpu.available(), "the kernel builds on this machine (g++ is part of the set-up)"


def _modules(n, d, dtype, seed):
    """Three modules' activations with planted values: exact edges, ties of both signs, NaN, +-Inf."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) * 3 for _ in range(3)]
    xs[2][:, d // 2] = torch.where(torch.arange(n) % 2 == 0, 70.0, -70.0)  # more than k equal magnitudes
    xs[0][0, 0], xs[1][0, 0] = -6.0, 6.0  # the same |x| later: the earlier value stays
    xs[0][1, d - 1] = 4.0  # exactly at an edge
    xs[1][2, d // 2] = float("nan")
    xs[2][3, d - 1] = float("inf")
    xs[2][4, 0] = -float("inf")
    return [x.to(dtype) for x in xs]


def _numpy_reduce(x, best):
    """One module in numpy: (ge, amax, nonfinite) and the position buffer after it."""
    v = x.astype(np.float64)
    a = np.abs(v)
    bad = ~np.isfinite(a)
    a = np.where(bad, 0.0, a)
    ge = np.stack([(a >= e).sum(0) for e in EDGES.astype(np.float64)], 1)
    wins = (a >= EDGES[0]) & (a > np.abs(best))
    return ge, a.max(0).astype(np.float32), int(bad.sum()), np.where(wins, v, best)


def _numpy_positions(best, k):
    a = np.abs(best)
    pos_ge = np.stack([(a >= e).sum(0) for e in EDGES.astype(np.float64)], 1)
    top = np.full((k, best.shape[1]), np.nan, np.float32)
    for d in range(best.shape[1]):
        vals = sorted((v for v in best[:, d] if abs(v) >= EDGES[0]), key=lambda v: (-abs(v), -v))[:k]
        top[: len(vals), d] = vals
    return pos_ge, top


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_reduce_and_positions_equal_numpy(dtype, d, threads):
    n, k = 70, 3  # 70 rows: more than one 64-row block per thread
    edges_t = torch.from_numpy(EDGES)
    pval = torch.zeros(n, d, dtype=dtype)
    best = np.zeros((n, d))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in _modules(n, d, dtype, seed=d):
            ge, amax, bad = fused_cpu.reduce(x, pval, edges_t)
            x_np = x.double().numpy()  # every dtype is exact in float64
            want_ge, want_max, want_bad, best = _numpy_reduce(x_np, best)
            assert np.array_equal(ge.numpy(), want_ge)
            assert np.array_equal(amax.numpy(), want_max)
            assert int(bad) == want_bad
            assert np.array_equal(pval.double().numpy(), best)
        pos_ge, top = fused_cpu.positions(pval, edges_t, k)
    finally:
        torch.set_num_threads(before)
    want_pos, want_top = _numpy_positions(best, k)
    assert np.array_equal(pos_ge, want_pos)
    assert np.array_equal(top, want_top, equal_nan=True)
    assert top[:, d // 2].tolist() == [70.0, 70.0, 70.0]  # equal magnitudes: the positive ones first
    if d > 1:  # (with one dim, module 2's 70 is that position's largest)
        assert pval[0, 0].item() == -6.0  # a tie keeps the earlier module's value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_in_any_row_of_a_block_of_four_hides_no_maximum(dtype):
    """Rows are read four at a time: a NaN in any of the four, beside a larger value in another, must
    neither enter the maxima nor hide that value (nor its hit)."""
    edges_t = torch.from_numpy(EDGES)
    for nan_row in range(4):
        for big_row in range(4):
            if nan_row == big_row:
                continue
            x = torch.zeros(4, 33, dtype=dtype)  # 33 columns: two 16-wide steps and a scalar tail
            for col in (5, 32):
                x[nan_row, col], x[big_row, col] = float("nan"), 50.0
            ge, amax, bad = fused_cpu.reduce(x, torch.zeros_like(x), edges_t)
            want_ge, want_max, want_bad, _ = _numpy_reduce(x.double().numpy(), np.zeros((4, 33)))
            assert amax[5].item() == amax[32].item() == 50.0, (nan_row, big_row)
            assert np.array_equal(amax.numpy(), want_max) and np.array_equal(ge.numpy(), want_ge)
            assert int(bad) == want_bad == 2


def test_wider_activations_and_one_row():
    """Hidden sizes of real models, one token, and a value the float32 edges meet exactly in bf16."""
    edges_t = torch.from_numpy(EDGES)
    for n, d in [(1, 4096), (3, 2880)]:
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(d)).bfloat16() * 4
        x[0, 17] = 8.0
        pval = torch.zeros_like(x)
        ge, amax, bad = fused_cpu.reduce(x, pval, edges_t)
        want_ge, want_max, want_bad, best = _numpy_reduce(x.double().numpy(), np.zeros((n, d)))
        assert np.array_equal(ge.numpy(), want_ge) and np.array_equal(amax.numpy(), want_max) and int(bad) == 0
        assert np.array_equal(pval.double().numpy(), best)


def test_a_kernel_that_cannot_be_built_means_the_sparse_reduction(tmp_path):
    """No usable compiler: one warning, available() is False, and a collection runs on the sparse
    reduction with the same statistics (in a fresh process with an empty build cache)."""
    code = (
        "import torch\n"
        "from outlier_hydra.collect import fused_cpu, OutlierCollector\n"
        "assert not fused_cpu.available()\n"
        "print(OutlierCollector(6.0).backend_for(torch.device('cpu')))\n"
    )
    env = _env(CXX=str(tmp_path / "no-compiler"), OUTLIER_HYDRA_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sparse"
    warnings = [line for line in out.stderr.splitlines() if "could not be built" in line]
    assert len(warnings) == 1, out.stderr


def test_a_compiler_without_openmp_or_native_flags_gets_the_portable_build(tmp_path):
    """A compiler that refuses -fopenmp and -march=native (as Apple's clang does -fopenmp): the
    second, portable set of flags builds, single-threaded, and gives the same numbers."""
    import shutil

    fake = tmp_path / "cxx"
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in -fopenmp|-march=native) echo "unsupported: $a" >&2; exit 1;; esac; done\n'
        f'exec {shutil.which("g++") or "c++"} "$@"\n'
    )
    fake.chmod(0o755)
    code = (
        "import torch\n"
        "from outlier_hydra.collect import fused_cpu\n"
        "from outlier_hydra.collect.reductions import dense_reduce\n"
        "assert fused_cpu.available()\n"
        "assert list(fused_cpu.build_directory(fused_cpu.FLAGS[1]).glob('*.so'))\n"
        "assert not list(fused_cpu.build_directory(fused_cpu.FLAGS[0]).glob('*.so'))\n"
        "x = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) * 4\n"
        "edges = torch.tensor([3.0, 6.0, 8.0])\n"
        "ge, amax, bad = fused_cpu.reduce(x, torch.zeros_like(x), edges)\n"
        "want = dense_reduce(x, torch.zeros_like(x), torch.zeros_like(x), edges)\n"
        "assert torch.equal(ge, want[0]) and torch.equal(amax, want[1]) and int(bad) == int(want[2])\n"
        "print('ok')\n"
    )
    env = _env(CXX=str(fake), OUTLIER_HYDRA_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "could not be built" not in out.stderr


def test_fused_is_the_cpu_default_and_refuses_another_device():
    from outlier_hydra.collect import OutlierCollector
    from outlier_hydra.errors import OutlierHydraError

    assert OutlierCollector(6.0).backend_for(torch.device("cpu")) == "fused"
    assert OutlierCollector(6.0, backend="fused").backend_for(torch.device("cpu")) == "fused"
    with pytest.raises(OutlierHydraError, match="analysis.collector.backend: fused runs on the CPU only"):
        OutlierCollector(6.0, backend="fused").backend_for(torch.device("cuda"))


def test_without_the_kernel_the_cpu_default_is_the_sparse_reduction(monkeypatch):
    from outlier_hydra.collect import OutlierCollector

    monkeypatch.setattr(fused_cpu, "available", lambda: False)
    assert OutlierCollector(6.0).backend_for(torch.device("cpu")) == "sparse"


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_absmax_and_hits_equal_numpy(dtype):
    """The stages' two reads on the CPU: max |t| per row (-1 for a row with a NaN; Inf is a maximum),
    and the flat positions where |x| >= t as float32 holds it (x exact, not t rounded to x's dtype)."""
    g = torch.Generator().manual_seed(5)
    for rows, cols in [(1, 1), (7, 37), (130, 64)]:
        t = torch.randn(rows, cols, generator=g) * 4
        t[0, 0] = -9.0
        if rows > 2:
            t[1, cols - 1], t[2, 0] = float("nan"), -float("inf")
        t = t.to(dtype)
        a = np.abs(t.double().numpy())
        want = np.where(np.isnan(a).any(1), -1.0, np.nan_to_num(a, nan=0.0).max(1)).astype(np.float32)
        assert np.array_equal(fused_cpu.row_absmax(t).numpy(), want)
        for threshold in (6.0, 6.1, 3.3):
            at = float(np.float32(threshold))
            want_hits = np.flatnonzero(a >= at)  # NaN compares False
            assert fused_cpu.hits(t, threshold).numpy().tolist() == want_hits.tolist()
    # values on both sides of thresholds that the dtype cannot hold: as the GPU path compares
    from outlier_hydra.collect.reductions import at_least

    x = torch.linspace(5.9, 6.3, 4001).to(dtype).reshape(1, -1)
    for threshold in (6.11, 6.0000001):
        assert fused_cpu.hits(x, threshold).tolist() == at_least(x.abs(), threshold).flatten().nonzero().flatten().tolist()
    # a strided view is read as its values
    t = torch.randn(9, 20, generator=g).to(dtype)[:, ::2]
    assert np.array_equal(fused_cpu.row_absmax(t).numpy(), np.abs(t.double().numpy()).max(1).astype(np.float32))


def test_segment_max_equals_the_torch_ops_and_numpy():
    """The experts stage's per-expert records: the largest value >= 0 per segment, ties to the
    smallest token and then the last row (tokens repeat where the implementation hides them), -1
    rows never, a segment with no row -1/-1. C++ (CPU) against the torch ops (GPU) and a loop."""
    from outlier_hydra.stages.experts import UNKNOWN_TOKEN
    from outlier_hydra.stages.experts.tensors import segment_max_torch

    g = torch.Generator().manual_seed(3)
    for s, n in [(1, 1), (50, 4), (400, 16)]:
        values = torch.randint(0, 5, (s,), generator=g).float() / 2  # few distinct values: many ties
        values[torch.rand(s, generator=g) < 0.2] = -1.0  # rows that hold no value
        segment = torch.randint(0, max(n - 1, 1), (s,), generator=g)  # the last segment empty
        token = torch.randint(0, 6, (s,), generator=g)
        token[torch.rand(s, generator=g) < 0.3] = UNKNOWN_TOKEN
        want_best, want_row = np.full(n, -1.0, np.float32), np.full(n, -1)
        for i in range(s):  # best value, then smallest token, then last row
            v, e = values[i].item(), segment[i].item()
            if v < 0:
                continue
            r = want_row[e]
            if r < 0 or v > want_best[e] or (v == want_best[e] and token[i] <= token[r]):
                want_best[e], want_row[e] = v, i
        for best, row in (
            fused_cpu.segment_max(values, segment, token, n),
            segment_max_torch(values, segment, token, n),
        ):
            assert best.numpy().tolist() == want_best.tolist() and row.numpy().tolist() == want_row.tolist()
        if n > 1:
            assert want_row[n - 1] == -1 and want_best[n - 1] == -1.0  # the segment left empty
    # a segment whose largest value is 0 still has its row (0 is a value; only -1 rows hold none)
    values, segment, token = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0, 0, 1]), torch.tensor([5, 3, 1])
    for best, row in (
        fused_cpu.segment_max(values, segment, token, 2),
        segment_max_torch(values, segment, token, 2),
    ):
        assert best.tolist() == [0.0, -1.0] and row.tolist() == [1, -1]
    with pytest.raises(RuntimeError, match="out of range"):
        fused_cpu.segment_max(torch.zeros(2), torch.tensor([0, 5]), torch.zeros(2, dtype=torch.long), 2)


def test_each_source_torch_and_cpu_get_their_own_build(monkeypatch, tmp_path):
    """A build is for the CPU it was made on (-march=native): its directory changes with the source,
    the torch version and the CPU's instruction sets, and lives under $OUTLIER_HYDRA_CACHE."""
    import platform

    monkeypatch.setenv("OUTLIER_HYDRA_CACHE", str(tmp_path))
    here = fused_cpu.build_directory()
    assert here.parent == tmp_path / "fused_cpu" and len(here.name) == 16
    if platform.system() == "Linux":
        assert fused_cpu._cpu_flags().split(":")[0].strip() in ("flags", "Features")
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\n")
    assert fused_cpu._cpu_flags(arm) == "Features\t: fp asimd sve"
    monkeypatch.setattr(fused_cpu, "_cpu_flags", lambda: "flags : sse2")
    other_cpu = fused_cpu.build_directory()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = fused_cpu.build_directory()
    source = tmp_path / "other.cpp"
    source.write_text(fused_cpu.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(fused_cpu, "SOURCE", source)
    other_source = fused_cpu.build_directory()
    assert len({here, other_cpu, other_torch, other_source}) == 4
    monkeypatch.delenv("OUTLIER_HYDRA_CACHE")
    assert fused_cpu.build_directory().parent == Path.home() / ".cache" / "outlier_hydra" / "fused_cpu"


@pytest.mark.parametrize("weighted", [True, False])
def test_routing_sums_equal_numpy(weighted):
    """The router stage's sums in one pass: choices per expert (an expert chosen twice counts twice),
    softmax entropy and top-1 share (1/k without weights), and each at the outlier positions per dim,
    laid out [E | entropy | share | E + 3 rows of d] as the stage's state vector."""
    g = torch.Generator().manual_seed(7)
    n, e, k, d = 50, 6, 3, 5
    logits = torch.randn(n, e, generator=g) * 3
    idx = torch.randint(0, e, (n, k), generator=g)
    weights = torch.rand(n, k, generator=g) if weighted else None
    hits = torch.unique(torch.randint(0, n * d, (40,), generator=g))
    got = fused_cpu.routing(logits, idx, weights, hits, d).numpy()
    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(1)
    w = weights.double().numpy() if weighted else np.ones((n, k))
    share = w.max(1) / w.sum(1)
    choices = np.zeros((n, e))
    np.add.at(choices, (np.repeat(np.arange(n), k), idx.numpy().ravel()), 1.0)
    v = np.concatenate([choices, entropy[:, None], share[:, None], np.ones((n, 1))], 1)  # [n, E + 3]
    per_dim = np.zeros((d, e + 3))
    for h in hits.tolist():
        per_dim[h % d] += v[h // d]
    want = np.concatenate([choices.sum(0), [entropy.sum(), share.sum()], per_dim.T.ravel()])
    assert got.shape == want.shape
    assert np.array_equal(got[:e], want[:e]) and np.array_equal(got[e + 2 :][: e * d], want[e + 2 :][: e * d])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="out of range"):
        fused_cpu.routing(logits, torch.full((n, k), e), weights, hits, d)


def test_a_build_killed_midway_blocks_nothing(tmp_path):
    """A process killed while building leaves torch's lock file and this project's lock (a dead pid on
    this host): the next process takes over and loads the kernel instead of waiting forever."""
    import json
    import shutil
    import socket

    cache = tmp_path / "cache"
    built = fused_cpu.build_directory()
    target = cache / "fused_cpu" / built.name
    shutil.copytree(built, target, ignore=shutil.ignore_patterns("lock", ".lock*"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (target / "lock").touch()  # torch's baton
    (target / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job_id": None}))
    code = "from outlier_hydra.collect import fused_cpu\nassert fused_cpu.available()\nprint('ok')\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(OUTLIER_HYDRA_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert not (target / "lock").exists() and not (target / ".lock").exists()


def test_the_build_step_loads_its_kernel_with_its_flags_and_says_when_it_compiles(tmp_path, caplog):
    """_build itself (the other build tests run it only in fresh processes, which mutation testing
    cannot map to it): here, where the kernel is loaded already and loading it again changes nothing,
    it clears torch's lock file left by a killed build and loads the library its name and flags make;
    then in a fresh process whose cache holds the compiled object but not the library, it links it and
    says so in its one log line."""
    import shutil

    directory = fused_cpu.build_directory()
    (directory / "lock").touch()  # torch's baton, left by a build killed midway: waited on forever
    with caplog.at_level("INFO", logger="outlier_hydra.collect.fused_cpu"):
        fused_cpu._build(fused_cpu.FLAGS[0])
    assert not caplog.records, "the library is there: nothing to build, nothing said"
    assert not (directory / "lock").exists()
    assert (directory / "outlier_hydra_fused_cpu.so").is_file()
    lines = (directory / "build.ninja").read_text().splitlines()
    cflags = next(line for line in lines if line.startswith("cflags ="))
    ldflags = next(line for line in lines if line.startswith("ldflags ="))
    assert cflags.split()[-len(fused_cpu.FLAGS[0]) :] == list(fused_cpu.FLAGS[0])
    assert ldflags.split()[:3] == ["ldflags", "=", "-shared"] and "-fopenmp" in ldflags.split()

    cache = tmp_path / "cache"
    target = cache / "fused_cpu" / directory.name
    shutil.copytree(directory, target, ignore=shutil.ignore_patterns("*.so", "lock", ".lock*"))
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "from outlier_hydra.collect import fused_cpu\n"
        "assert fused_cpu.available()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(OUTLIER_HYDRA_CACHE=str(cache)), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("outlier_hydra.collect.fused_cpu:")]
    assert said == [
        f"outlier_hydra.collect.fused_cpu: building the one-pass CPU reduction in {target} "
        "(once per machine type, about 15 s)"
    ]
    assert (target / "outlier_hydra_fused_cpu.so").is_file()


def test_a_build_makes_its_cache_directory_parents_and_all(tmp_path, monkeypatch):
    """A first build on a machine whose cache root does not exist yet ($OUTLIER_HYDRA_CACHE pointing
    at new folders): the build directory is made with its parents, and torch is asked to build there
    with each set of flags (OpenMP's linked only where compiled in). torch's compiler is stood in for."""
    import torch.utils.cpp_extension

    asked = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: asked.append(kw))
    monkeypatch.setenv("OUTLIER_HYDRA_CACHE", str(tmp_path / "new" / "cache"))
    for flags in fused_cpu.FLAGS:
        fused_cpu._build(flags)
        directory = fused_cpu.build_directory(flags)
        assert directory.is_dir() and directory.is_relative_to(tmp_path / "new" / "cache" / "fused_cpu")
        assert {k: asked[-1][k] for k in ("name", "sources", "build_directory", "extra_cflags", "extra_ldflags")} == {
            "name": "outlier_hydra_fused_cpu",
            "sources": [str(fused_cpu.SOURCE)],
            "build_directory": str(directory),
            "extra_cflags": list(flags),
            "extra_ldflags": ["-fopenmp"] if "-fopenmp" in flags else [],
        }
        assert not asked[-1].get("is_python_module", True), "a library of torch ops, not a Python module"
    assert len(asked) == len(fused_cpu.FLAGS) > 1


def test_a_build_waits_while_another_live_process_holds_the_build_lock(tmp_path):
    """Two processes on one cache: the second waits for the first's build instead of building over
    it, and loads the library once the first lets go."""
    import shutil

    from outlier_hydra.lock import RunLock

    fused_cpu._build(fused_cpu.FLAGS[0])  # (here the library is loaded already: nothing changes)
    directory = fused_cpu.build_directory()
    target = tmp_path / "cache" / "fused_cpu" / directory.name
    shutil.copytree(directory, target, ignore=shutil.ignore_patterns("lock", ".lock*"))
    holder = RunLock(target)
    holder.acquire()  # this process, alive, is building it
    code = (
        "import sys\n"
        "from outlier_hydra.collect import fused_cpu\n"
        "print('ready', flush=True)\n"
        "assert fused_cpu.available()\n"
        "assert not fused_cpu.build_directory(fused_cpu.FLAGS[1]).exists(), 'the portable build instead'\n"
        "print('loaded', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env(OUTLIER_HYDRA_CACHE=str(tmp_path / "cache")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(5.0)  # loading a built library takes ~1 s: it would be done by now without waiting
        assert proc.poll() is None, "it waits while the holder lives"
    finally:
        holder.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "loaded", err[-3000:]
    assert "could not be built" not in err
