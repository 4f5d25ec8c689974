"""The one-pass Triton reduction (collect/fused_triton.py) against the dense reference, bit for bit.

Without a GPU the kernel runs in Triton's interpreter (conftest turns it on before triton is
imported): the same kernel source, the same launch shapes, numpy underneath. On a GPU machine these
tests run the compiled kernel on CUDA tensors instead.
"""

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
    fused_triton.Blocks(16, 32, 2, 4, True),  # several programs per column block, per-element sums
    fused_triton.Blocks(32, 64, 1, 2, False),
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
    assert fused_triton.Blocks.default() == fused_triton.Blocks(128, 16, 2, 8, False)
    monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", "16,32,4,4,elementwise")
    assert fused_triton.Blocks.default() == fused_triton.Blocks(16, 32, 4, 4, True)
    assert str(fused_triton.Blocks.default()) == "16,32,4,4,elementwise"
    for bad in ("16,32,4", "16,32,4,4,fast", "a,b,c,d"):
        monkeypatch.setenv("OUTLIER_HYDRA_TRITON_BLOCKS", bad)
        with pytest.raises(ValueError, match=f"OUTLIER_HYDRA_TRITON_BLOCKS: '{bad}' is not"):
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
