"""The one-pass Triton reduction (collect/fused_triton.py) against the dense reference, bit for bit.

Without a GPU the kernel runs in Triton's interpreter (conftest turns it on before triton is
imported): the same kernel source, the same launch shapes, numpy underneath. On a GPU machine these
tests run the compiled kernel on CUDA tensors instead.
"""

import math
import subprocess
import sys

import pytest
import torch

from outlier_hydra.collect import OutlierCollector, fused_triton
from outlier_hydra.collect.reductions import dense_reduce, edges_on, position_counts
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.stats import DEFAULT_EDGES, histogram_edges

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EDGES = edges_on(tuple(histogram_edges(DEFAULT_EDGES, 6.0)), DEVICE)
SHAPES = [
    fused_triton.Blocks(),
    fused_triton.Blocks(16, 32, 2, 4, 1),  # several programs per column block, per-element sums
    fused_triton.Blocks(32, 64, 1, 2, 2),
]


def _activations(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    if rows and cols > 11:
        x[:, 11] *= 40  # an outlier dim reaching the high edges
        x[rows // 2, 3] = float("nan")
        x[0, 9] = float("inf")
        x[rows - 1, 9] = -float("inf")
        x[1, 4] = 6.0  # exactly on an edge
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("blocks", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols", [(257, 130), (64, 32), (1, 1), (3, 5)])
def test_the_kernel_gives_the_dense_reduction_bit_for_bit(blocks, dtype, rows, cols):
    first = _activations(rows, cols, dtype, 0)
    tensors = [
        first,
        -first,  # every |x| ties: the position buffer keeps the earlier signed value
        _activations(cols, rows, dtype, 1).t(),  # not contiguous
        _activations(rows, cols, dtype, 2) * 2,
    ]
    pabs = torch.zeros(rows, cols, dtype=dtype, device=DEVICE)
    pval = torch.zeros_like(pabs)
    mine = torch.zeros_like(pabs)
    for x in tensors:
        ge, amax, bad, pabs, pval = dense_reduce(x, pabs, pval, EDGES)
        ge2, amax2, bad2 = fused_triton.reduce(x, mine, EDGES, blocks)
        assert ge2.dtype == torch.int32 and amax2.dtype == torch.float32 and bad2.dtype == torch.int32
        assert torch.equal(ge2.long(), ge)
        assert torch.equal(amax2, amax.float())
        assert int(bad2) == int(bad)
        assert torch.equal(mine, pval)
    assert torch.equal(fused_triton.counts(mine, EDGES).long(), position_counts(pabs, EDGES))
    if rows > 2 and cols > 11:
        assert int(bad) == 3 and ge[11, -2] > rows // 2, "the planted values are in the data (dim 11 past 100)"


def test_no_rows_give_zeros():
    ge, amax, bad = fused_triton.reduce(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 5, device=DEVICE), EDGES)
    assert not ge.any() and ge.shape == (5, EDGES.numel()) and not amax.any() and int(bad) == 0


def test_the_kernel_takes_only_dtypes_whose_magnitudes_float32_holds_and_a_matching_buffer():
    x = torch.ones(4, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        fused_triton.reduce(x, torch.zeros_like(x), EDGES)
    x = x.float()
    with pytest.raises(ValueError, match="position buffer"):
        fused_triton.reduce(x, torch.zeros(3, 4, device=DEVICE).t(), EDGES)
    with pytest.raises(ValueError, match="position buffer"):
        fused_triton.reduce(x, torch.zeros(4, 3, dtype=torch.bfloat16, device=DEVICE), EDGES)


def test_the_refusals_say_what_was_given_and_what_is_taken():
    x = torch.ones(4, 3, dtype=torch.float64, device=DEVICE)
    taken = "torch.float32, torch.bfloat16, torch.float16"
    with pytest.raises(TypeError) as e:
        fused_triton.reduce(x, torch.zeros_like(x), EDGES)
    assert str(e.value) == f"the triton reduction takes {taken}, not torch.float64"
    with pytest.raises(ValueError) as e:
        fused_triton.reduce(x.float(), torch.zeros(4, 3, device=DEVICE).t().contiguous().t(), EDGES)
    assert str(e.value) == "the position buffer must be contiguous, of x's shape and dtype"
    with pytest.raises(ValueError, match="position buffer"):  # contiguous, of x's dtype, not of its shape
        fused_triton.reduce(x.float(), torch.zeros(3, 4, device=DEVICE), EDGES)
    expert = torch.zeros(4, dtype=torch.long, device=DEVICE)
    for y_dtype, x_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        with pytest.raises(TypeError) as e:
            fused_triton.expert_rows(x.to(y_dtype), x.to(x_dtype), expert, expert, None, 6.0, 1)
        assert str(e.value) == f"expert_rows takes {taken}, not {y_dtype} / {x_dtype}"


class _Launches:
    """A stand-in for the jitted kernels: records each launch's grid and arguments."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, name="reduce_kernel"):
        return _Grid(self, name)


class _Grid:
    def __init__(self, launches, name):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.calls.append((self.name, grid, args, kwargs))


@pytest.mark.parametrize(
    "n, d, sms", [(8192, 2048, 132), (8192, 2048, 4), (100, 2048, 132), (8192, 32, 4), (65, 7, 1), (1, 1, 1), (0, 7, 2)]
)
@pytest.mark.parametrize("blocks", SHAPES, ids=str)
def test_each_launch_covers_every_row_and_column_once_in_the_shape_asked_for(monkeypatch, n, d, sms, blocks):
    """What the kernel is told (Triton runs whatever grid it is given: a wrong one is silent on the
    GPU): tiles of the asked shape, every row and column in exactly one program, about
    programs_per_sm programs per multiprocessor where there are rows enough, the position buffer
    updated only by reduce()."""
    launches = _Launches()
    monkeypatch.setattr(fused_triton, "_kernel", launches)
    monkeypatch.setattr(fused_triton, "_multiprocessors", lambda device: sms)
    x = torch.zeros(n, d)
    pval = torch.zeros(n, d)
    ge, amax, bad = fused_triton.reduce(x, pval, EDGES, blocks)
    assert (ge.dtype, amax.dtype, bad.dtype) == (torch.int32, torch.float32, torch.int32)
    assert ge.shape == (d, EDGES.numel()) and amax.shape == (d,) and bad.shape == ()
    fused_triton.counts(pval, EDGES)
    (_, grid, args, kw), (_, grid2, args2, kw2) = launches.calls
    assert args[0] is x and args[1] is pval and args[2] is EDGES and kw["UPDATE"] is True
    assert args2[0] is pval and args2[1] is pval and args2[2] is EDGES and kw2["UPDATE"] is False
    assert args[3:6] == (ge, amax, bad)  # the kernel writes the buffers returned
    e = EDGES.numel()
    assert kw["E"] == e and kw["EP"] >= e and kw["EP"] & (kw["EP"] - 1) == 0 and kw["EP"] < 2 * e
    assert (kw["BN"], kw["BD"], kw["num_warps"]) == (blocks.rows, blocks.cols, blocks.warps)
    assert kw["ELEMENTWISE"] == min(blocks.elementwise, e)
    assert args[6:10] == (n, d, x.stride(0), x.stride(1))
    col_blocks, splits = grid
    rows_per_program = args[10]
    assert (col_blocks - 1) * blocks.cols < d <= col_blocks * blocks.cols
    assert all(isinstance(v, int) for v in (col_blocks, splits, rows_per_program))
    assert rows_per_program % blocks.rows == 0 and rows_per_program > 0 and splits >= 1
    assert (splits - 1) * rows_per_program < max(n, 1) <= splits * rows_per_program  # no program without rows
    assert (rows_per_program - blocks.rows) * splits < max(n, 1)  # no whole tile of slack per program
    wanted = -(-blocks.programs_per_sm * sms // col_blocks)  # programs per column block for the target
    assert splits <= max(1, wanted)
    target = max(1, min(wanted, -(-n // blocks.rows)))  # as many as the target or the row tiles allow
    assert splits >= (target + 1) // 2  # (tiles of whole BN rows: at worst half of them)
    default = fused_triton.launch_shape()  # counts() launches in the shape in use
    assert (kw2["BN"], kw2["BD"], kw2["num_warps"]) == (default.rows, default.cols, default.warps)


def test_the_edges_are_padded_to_a_power_of_two():
    """tl.arange needs a power of two: the smallest at or above the edge count (1 for none)."""
    for n in range(70):
        assert fused_triton._next_power_of_2(n) == (2 ** math.ceil(math.log2(n)) if n > 1 else 1), n


def test_launch_shape_default_is_used_when_none_is_given(monkeypatch):
    launches = _Launches()
    monkeypatch.setattr(fused_triton, "_kernel", launches)
    monkeypatch.setattr(fused_triton, "_multiprocessors", lambda device: 8)
    monkeypatch.setattr(fused_triton, "launch_shape", lambda: fused_triton.Blocks(16, 8, 1, 2, 1))
    x = torch.zeros(64, 16)
    fused_triton.reduce(x, torch.zeros_like(x), EDGES)
    fused_triton.counts(x, EDGES)
    for _, grid, args, kw in launches.calls:
        assert (kw["BN"], kw["BD"], kw["num_warps"], kw["ELEMENTWISE"]) == (16, 8, 2, 1)
        assert grid == (2, 4) and args[10] == 16  # 2 column blocks, 8 programs of 16 rows over 2


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_the_experts_kernel_launch_and_outputs(monkeypatch, default_dtype):
    """The grids and the buffers the two kernels write: float32 row maxima, int64 keys and rows
    starting at -1, int32 token and outlier counts starting at 0, whatever torch's default dtype
    (research code sets float64); the second kernel reads the first's row maxima and keys."""
    launches = _Launches()
    monkeypatch.setattr(fused_triton, "_kernel", launches)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        for n, valid in ((37, None), (0, torch.ones(0, dtype=torch.bool)), (1025, torch.ones(1025, dtype=torch.bool))):
            y, x = torch.zeros(n, 6, dtype=torch.float32), torch.zeros(n, 4, dtype=torch.bfloat16)
            expert, token = torch.zeros(n, dtype=torch.long), torch.arange(n)
            got = fused_triton.expert_rows(y, x, expert, token, valid, 6.0, 3)
            (name, grid, args, kw), (name2, grid2, args2, kw2) = launches.calls[-2:]
            assert name == "expert_rows_kernel" and grid == (max(1, -(-n // 32)),)
            assert name2 == "expert_at_kernel" and grid2 == (max(1, -(-n // fused_triton.AT_ROWS)),)
            assert args[0] is y and args[1] is x and args[2] is expert and args[3] is token
            assert args[4] is (y if valid is None else valid) and kw["HAS_VALID"] is (valid is not None)
            y_row, x_row, keys, tokens, counts = args[5:10]
            assert y_row.dtype == x_row.dtype == torch.float32 and y_row.shape == x_row.shape == (n,)
            assert keys.dtype == torch.int64 and keys.shape == (2, 3) and (keys == -1).all()
            assert tokens.dtype == counts.dtype == torch.int32 and tokens.shape == (3,) and counts.shape == (3, 6)
            assert not tokens.any() and not counts.any()
            assert args[10:] == (n, 3, 6, 4, *y.stride(), *x.stride(), 6.0)
            assert (kw["BR"], kw["BC"], kw["num_warps"]) == (32, 256, 4)  # the defaults
            assert all(a is b for a, b in zip(args2[:5], (expert, token, y_row, x_row, keys)))
            at = args2[5]
            assert at.dtype == torch.int64 and at.shape == (2, 3) and (at == -1).all() and args2[6:] == (n, 3)
            assert kw2 == {"BR": fused_triton.AT_ROWS}
            # nothing launched: no expert ran
            assert got.tokens.tolist() == [0, 0, 0] and got.counts.shape == (3, 6) and not got.counts.any()
            assert got.out_max.tolist() == got.in_max.tolist() == [-1.0] * 3
            assert got.out_row.tolist() == got.in_row.tolist() == [-1] * 3
            assert (got.tokens.dtype, got.counts.dtype, got.out_row.dtype) == (torch.int64, torch.int64, torch.int64)
            assert got.out_max.dtype == got.in_max.dtype == torch.float32
            assert {t.device for t in vars(got).values()} == {y.device}
        fused_triton.expert_rows(y, x, expert, token, None, 6.0, 3, tile=(64, 128, 8))
        name, grid, args, kw = launches.calls[-2]
        assert grid == (-(-n // 64),) and (kw["BR"], kw["BC"], kw["num_warps"]) == (64, 128, 8)
    finally:
        torch.set_default_dtype(before)


def test_the_experts_kernel_reads_a_maximum_back_from_its_key():
    """A key's upper 32 bits are the value's float32 bits: exact for every non-negative float32,
    Inf and the smallest subnormal too."""
    from outlier_hydra.collect import fused_triton_kernel  # noqa: F401 (the kernel's module imports)

    values = torch.tensor([0.0, 1.4e-45, 1.0, 6.0, 3.4e38, float("inf")], dtype=torch.float32)
    keys = (values.view(torch.int32).long() << 32) | 12345
    back = (keys >> 32).to(torch.int32).view(torch.float32)
    assert torch.equal(back, values) and (keys[1:] > keys[:-1]).all()


def test_launch_shape_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "128,16,2,8")
    assert fused_triton.Blocks.default() == fused_triton.Blocks(128, 16, 2, 8, 0)
    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "16,32,4,4,2")
    assert fused_triton.Blocks.default() == fused_triton.Blocks(16, 32, 4, 4, 2)
    assert str(fused_triton.Blocks.default()) == "16,32,4,4,2"
    for text in ("1,1,1,1,0", "64,32,8,1,1", "64,32,8,4,0"):  # the smallest values each field takes
        monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", text)
        assert str(fused_triton.Blocks.default()) == text
    for bad in ("16,32,4", "16,32,4,4,3", "16,32,0,4", "a,b,c,d", "16,32,4,4,1,1"):
        monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", bad)
        with pytest.raises(ValueError, match=f"OUTLIER_HYDRA_TRITON_BLOCKS: '{bad}' is not rows,cols"):
            fused_triton.Blocks.default()
    monkeypatch.delenv("OUTLIER_HYDRA_TRITON_BLOCKS")
    assert fused_triton.Blocks.default() == fused_triton.Blocks()


def test_triton_is_the_cuda_default_where_it_imports(monkeypatch):
    assert OutlierCollector(6.0).backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setattr(fused_triton, "available", lambda device_type="cuda": False)
    assert OutlierCollector(6.0).backend_for(torch.device("cuda")) == "compiled"
    with pytest.raises(OutlierHydraError, match="analysis.collector.backend: triton needs a CUDA device"):
        OutlierCollector(6.0, backend="triton").backend_for(torch.device("cuda"))


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    # triton settles the interpreter when first imported: imported here with TRITON_INTERPRET=0, every
    # later kernel of this process failed ("Cannot call @triton.jit'd outside of the scope of a kernel")
    import triton  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused_triton.available.cache_clear()
    try:
        with pytest.raises(OutlierHydraError, match=r"on cpu \(on the CPU: only in Triton's interpreter"):
            OutlierCollector(6.0, backend="triton").backend_for(torch.device("cpu"))
        assert OutlierCollector(6.0).backend_for(torch.device("cpu")) == "fused", "auto never picks it there"
    finally:
        fused_triton.available.cache_clear()


def test_the_interpreter_setting_is_read_as_triton_reads_it(monkeypatch):
    """Whether the CPU may run the kernel follows TRITON_INTERPRET exactly as triton's own parser takes
    it (its getenv_bool); "y" was once read as off here while triton ran the interpreter."""
    from triton._C.libtriton import getenv_bool

    for value in ["1", "0", "true", "TRUE", "On", "yes", "Y", "y", "off", "false", "no", "", "2", " 1", "1 "]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert fused_triton._interpreting() == getenv_bool("TRITON_INTERPRET", False), repr(value)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused_triton._interpreting() and not getenv_bool("TRITON_INTERPRET", False)


def test_the_torch_row_maxima_keep_an_inf_as_the_cpu_kernel_does(monkeypatch):
    """The experts stage's row maxima in torch ops (a GPU without triton): an Inf stays Inf (nan_to_num
    alone turned it into float32's largest value), a NaN row is -1, as the C++ kernel gives them."""
    from outlier_hydra.collect import fused_cpu
    from outlier_hydra.stages.experts.tensors import row_absmax

    t = torch.tensor([[1.0, -float("inf")], [float("nan"), 2.0], [-3.0, 2.0]])
    assert fused_cpu.available()
    cpp = fused_cpu.row_absmax(t)
    monkeypatch.setattr(fused_cpu, "available", lambda: False)
    assert row_absmax(t).tolist() == cpp.tolist() == [float("inf"), -1.0, 3.0]


AOT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from outlier_hydra.collect import fused_triton_kernel as K

hopper = GPUTarget("cuda", 90, 32)  # an H100/H200: compiled down to PTX and machine code, no GPU needed
reduce = {"x_ptr": "*bf16", "pval_ptr": "*bf16", "edges_ptr": "*fp32", "ge_ptr": "*i32", "amax_ptr": "*fp32",
          "bad_ptr": "*i32", "n_rows": "i32", "n_cols": "i32", "stride_row": "i32", "stride_col": "i32",
          "rows_per_program": "i32", "E": "constexpr", "EP": "constexpr", "BN": "constexpr", "BD": "constexpr",
          "UPDATE": "constexpr", "ELEMENTWISE": "constexpr"}
for elementwise in (0, 1, 2):
    for update in (True, False):
        consts = {"E": 14, "EP": 16, "BN": 64, "BD": 32, "UPDATE": update, "ELEMENTWISE": elementwise}
        k = triton.compile(ASTSource(fn=triton.jit(K.reduce_kernel), signature=reduce, constexprs=consts), target=hopper)
        assert ".entry reduce_kernel" in k.asm["ptx"] and len(k.asm["cubin"]) > 0
experts = {"y_ptr": "*bf16", "x_ptr": "*bf16", "expert_ptr": "*i64", "token_ptr": "*i64", "valid_ptr": "*i1",
           "y_row_ptr": "*fp32", "x_row_ptr": "*fp32", "keys_ptr": "*i64", "tokens_ptr": "*i32", "counts_ptr": "*i32",
           "n_rows": "i32", "n_experts": "i32", "n_out": "i32", "n_in": "i32",
           "stride_y_row": "i32", "stride_y_col": "i32", "stride_x_row": "i32", "stride_x_col": "i32",
           "threshold": "fp32", "HAS_VALID": "constexpr", "BR": "constexpr", "BC": "constexpr"}
for has_valid in (True, False):
    consts = {"HAS_VALID": has_valid, "BR": 16, "BC": 256}
    k = triton.compile(ASTSource(fn=triton.jit(K.expert_rows_kernel), signature=experts, constexprs=consts), target=hopper)
    assert ".entry expert_rows_kernel" in k.asm["ptx"] and len(k.asm["cubin"]) > 0
at = {"expert_ptr": "*i64", "token_ptr": "*i64", "y_row_ptr": "*fp32", "x_row_ptr": "*fp32", "keys_ptr": "*i64",
      "at_ptr": "*i64", "n_rows": "i32", "n_experts": "i32", "BR": "constexpr"}
k = triton.compile(ASTSource(fn=triton.jit(K.expert_at_kernel), signature=at, constexprs={"BR": 1024}), target=hopper)
assert ".entry expert_at_kernel" in k.asm["ptx"] and "red.global.gpu.relaxed.max.s64" in k.asm["ptx"]  # signed 64-bit
print("compiled")
"""


def test_the_kernels_compile_for_a_hopper_gpu_without_one(tmp_path):
    """The interpreter runs what Python allows; the compiler is stricter (a name given two types in an
    if/else, a type it cannot lower). Every variant of both kernels is compiled here for sm_90, as
    on an H100/H200, down to machine code with the ptxas Triton ships: no GPU needed."""
    import os

    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_CACHE_DIR": str(tmp_path / "cache"),
        "TRITON_DEFAULT_FP_FUSION": "1",
    }
    out = subprocess.run([sys.executable, "-c", AOT], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "compiled", out.stderr[-3000:]
