"""The one-pass Triton reduction (collect/fused_triton.py) against the dense reference, bit for bit.

Without a GPU the kernel runs in Triton's interpreter (conftest turns it on before triton is
imported): the same kernel source, the same launch shapes, numpy underneath. On a GPU machine these
tests run the compiled kernel on CUDA tensors instead.
"""

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


def test_launch_shape_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "128,16,2,8")
    assert fused_triton.Blocks.default() == fused_triton.Blocks(128, 16, 2, 8, 0)
    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "16,32,4,4,2")
    assert fused_triton.Blocks.default() == fused_triton.Blocks(16, 32, 4, 4, 2)
    assert str(fused_triton.Blocks.default()) == "16,32,4,4,2"
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
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused_triton.available.cache_clear()
    try:
        with pytest.raises(OutlierHydraError, match=r"on cpu \(on the CPU: only in Triton's interpreter"):
            OutlierCollector(6.0, backend="triton").backend_for(torch.device("cpu"))
        assert OutlierCollector(6.0).backend_for(torch.device("cpu")) == "fused", "auto never picks it there"
    finally:
        fused_triton.available.cache_clear()


def test_the_torch_row_maxima_keep_an_inf_as_the_cpu_kernel_does(monkeypatch):
    """The experts stage's row maxima in torch ops (a GPU without triton): an Inf stays Inf (nan_to_num
    alone turned it into float32's largest value), a NaN row is -1, as the C++ kernel gives them."""
    from outlier_hydra.collect import fused_cpu
    from outlier_hydra.stages.experts import Experts

    t = torch.tensor([[1.0, -float("inf")], [float("nan"), 2.0], [-3.0, 2.0]])
    assert fused_cpu.available()
    cpp = fused_cpu.row_absmax(t)
    monkeypatch.setattr(fused_cpu, "available", lambda: False)
    assert Experts._row_absmax(t).tolist() == cpp.tolist() == [float("inf"), -1.0, 3.0]


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
experts = {"y_ptr": "*bf16", "x_ptr": "*bf16", "expert_ptr": "*i64", "valid_ptr": "*i1", "y_row_ptr": "*fp32",
           "x_row_ptr": "*fp32", "counts_ptr": "*i32", "n_rows": "i32", "n_out": "i32", "n_in": "i32",
           "stride_y_row": "i32", "stride_y_col": "i32", "stride_x_row": "i32", "stride_x_col": "i32",
           "threshold": "fp32", "HAS_VALID": "constexpr", "BR": "constexpr", "BC": "constexpr"}
for has_valid in (True, False):
    consts = {"HAS_VALID": has_valid, "BR": 16, "BC": 256}
    k = triton.compile(ASTSource(fn=triton.jit(K.expert_rows_kernel), signature=experts, constexprs=consts), target=hopper)
    assert ".entry expert_rows_kernel" in k.asm["ptx"] and len(k.asm["cubin"]) > 0
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
