"""The one-pass GPU reduction: a Triton kernel (fused_triton_kernel.py) per hooked tensor.

The same statistics as reductions.dense_reduce, bit for bit, at the cost of one read of x and of the
position buffer: two launches per hook (the zeroed outputs, then the kernel), no host sync, and none
of torch.compile's per-call guard checks. Like the C++ CPU reduction it keeps only the signed
position buffer pval; |pval| is the position's largest |x| so far.

Triton ships with PyTorch's CUDA builds. On the CPU the kernel runs only in Triton's interpreter
(TRITON_INTERPRET=1 before triton is imported; numpy, slow): the tests' way to run it without a GPU.
Where triton cannot be imported the collector uses torch.compile's reduction instead.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # |x| exact in float32, as the edges


@dataclass(frozen=True)
class Blocks:
    """The launch shape: rows and columns per tile, programs per multiprocessor, warps per program,
    and how many of the lowest edges (0, 1, 2) are counted per element instead of by a reduction per
    tile (fused_triton_kernel.py). Tuned with scripts/reduce_bench.py; $OUTLIER_HYDRA_TRITON_BLOCKS
    ("rows,cols,programs,warps[,elementwise]") overrides the default without a code change."""

    rows: int = 128  # the fastest of the shapes tried on an H200 (benchmarks/results/*reduce_bench.log)
    cols: int = 32
    programs_per_sm: int = 8
    warps: int = 4
    elementwise: int = 0

    @classmethod
    def default(cls) -> Blocks:
        text = os.environ.get("OUTLIER_HYDRA_TRITON_BLOCKS")
        if not text:
            return cls()
        try:
            values = [int(v) for v in text.split(",")]
            if len(values) not in (4, 5) or min(values[:4]) < 1 or values[4:] not in ([], [0], [1], [2]):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"OUTLIER_HYDRA_TRITON_BLOCKS: {text!r} is not rows,cols,programs,warps[,elementwise 0-2]"
            ) from None
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.rows},{self.cols},{self.programs_per_sm},{self.warps},{self.elementwise}"


@functools.lru_cache(maxsize=4)
def available(device_type: str = "cuda") -> bool:
    """Whether the kernel runs on this kind of device: CUDA where triton imports; the CPU only where
    triton was imported with TRITON_INTERPRET=1 (its interpreter: the tests' way without a GPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and _interpreting()


def _interpreting() -> bool:
    """TRITON_INTERPRET read as triton reads it (its getenv_bool: these words, any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=4)
def _kernel(name: str = "reduce_kernel"):
    import triton

    from outlier_hydra.collect import fused_triton_kernel

    return triton.jit(getattr(fused_triton_kernel, name))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch(x: torch.Tensor, pval: torch.Tensor | None, edges_t: torch.Tensor, blocks: Blocks | None):
    b = blocks or launch_shape()
    n, d = x.shape
    e = edges_t.numel()
    out = torch.zeros(d * e + d + 1, dtype=torch.int32, device=x.device)
    ge, amax, bad = out[: d * e].view(d, e), out[d * e : d * e + d].view(torch.float32), out[-1]
    col_blocks = _ceil_div(d, b.cols)
    # rows split so that there are about programs_per_sm programs per multiprocessor
    splits = max(1, min(_ceil_div(n, b.rows), _ceil_div(b.programs_per_sm * _multiprocessors(x.device), col_blocks)))
    rows_per_program = max(1, _ceil_div(_ceil_div(n, splits), b.rows)) * b.rows
    splits = max(1, _ceil_div(n, rows_per_program))
    _kernel()[(col_blocks, splits)](
        x,
        x if pval is None else pval,
        edges_t,
        ge,
        amax,
        bad,
        n,
        d,
        x.stride(0),
        x.stride(1),
        rows_per_program,
        E=e,
        EP=_next_power_of_2(e),
        BN=b.rows,
        BD=b.cols,
        UPDATE=pval is not None,
        ELEMENTWISE=min(b.elementwise, e),
        num_warps=b.warps,
    )
    return ge, amax, bad


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def reduce(x: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor, blocks: Blocks | None = None):
    """x [N, D] -> (ge [D, E] int32, amax [D] float32, nonfinite [] int32); pval [N, D] (contiguous,
    x's dtype) updated in place. x may have any strides."""
    if x.dtype not in DTYPES:
        raise TypeError(f"the triton reduction takes {', '.join(map(str, DTYPES))}, not {x.dtype}")
    if not pval.is_contiguous() or pval.shape != x.shape or pval.dtype != x.dtype:
        raise ValueError("the position buffer must be contiguous, of x's shape and dtype")
    return _launch(x, pval, edges_t, blocks)


def counts(x: torch.Tensor, edges_t: torch.Tensor) -> torch.Tensor:
    """ge [D, E] int32: per column, the count of |x| at or above each edge (NaN/Inf not counted)."""
    return _launch(x, None, edges_t, None)[0]


@functools.lru_cache(maxsize=1)
def launch_shape() -> Blocks:
    """The launch shape in use: the default, or $OUTLIER_HYDRA_TRITON_BLOCKS (read once; a bad value
    raises ValueError naming the variable, which a run checks with its config, before loading)."""
    return Blocks.default()


EXPERT_ROWS = 32  # rows per program of expert_rows: the fastest tile on an H200 (benchmarks/results/*reduce_bench.log)
EXPERT_COLS = 256
EXPERT_WARPS = 4
AT_ROWS = 1024  # rows per program of the second kernel (reads 3 numbers a row)


@dataclass
class ExpertRows:
    """Per expert of one down projection's rows (expert_rows): rows counted, the largest |y| and |x|
    (float32, -1: no row) and the row holding each (int64, -1: none), counts [n_experts, H] int64;
    and per row its max |y| (float32, -1: a NaN row or one not counted)."""

    tokens: torch.Tensor
    out_max: torch.Tensor
    out_row: torch.Tensor
    in_max: torch.Tensor
    in_row: torch.Tensor
    counts: torch.Tensor
    row_out_max: torch.Tensor


def expert_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    expert: torch.Tensor,
    token: torch.Tensor,
    valid: torch.Tensor | None,
    threshold: float,
    n_experts: int,
    tile: tuple[int, int, int] | None = None,
) -> ExpertRows:
    """One read of a down projection's output rows y [S, H] and input rows x [S, I] (stages/experts.py),
    row s by expert[s] (int64) for token[s] (int64), over the rows where valid. Per expert: the rows
    counted; the largest max |y| of a row and the largest max |x| of a row, each with its row (equal
    values: the earliest token, then the last row; a row holding a NaN holds no value); the count of
    |y| >= threshold (as float32 holds it) per output dim. Two launches after the zeroed outputs, no
    host sync: the reads (fused_triton_kernel.expert_rows_kernel), then the rows of the maxima. tile:
    (rows, cols, warps) of the first kernel's programs, EXPERT_ROWS, EXPERT_COLS and EXPERT_WARPS by
    default (scripts/reduce_bench.py --tune tries others)."""
    if y.dtype not in DTYPES or x.dtype not in DTYPES:
        raise TypeError(f"expert_rows takes {', '.join(map(str, DTYPES))}, not {y.dtype} / {x.dtype}")
    n, h = y.shape
    dev = y.device
    expert, token = expert.contiguous(), token.contiguous()  # read by row index
    valid = None if valid is None else valid.contiguous()
    row_max = torch.empty(2, n, dtype=torch.float32, device=dev)  # max |y|, max |x| of each row
    marks = torch.full((2, 2, n_experts), -1, dtype=torch.int64, device=dev)  # keys, then their rows
    sums = torch.zeros(n_experts * (h + 1), dtype=torch.int32, device=dev)  # tokens, then counts
    y_row, x_row = row_max
    keys, at = marks
    tokens, counts = sums[:n_experts], sums[n_experts:].view(n_experts, h)
    rows_per_program, cols, warps = tile or (EXPERT_ROWS, EXPERT_COLS, EXPERT_WARPS)
    _kernel("expert_rows_kernel")[(max(1, _ceil_div(n, rows_per_program)),)](
        y,
        x,
        expert,
        token,
        y if valid is None else valid,
        y_row,
        x_row,
        keys,
        tokens,
        counts,
        n,
        n_experts,
        h,
        x.shape[1],
        y.stride(0),
        y.stride(1),
        x.stride(0),
        x.stride(1),
        float(threshold),
        HAS_VALID=valid is not None,
        BR=rows_per_program,
        BC=cols,
        num_warps=warps,
    )
    _kernel("expert_at_kernel")[(max(1, _ceil_div(n, AT_ROWS)),)](
        expert, token, y_row, x_row, keys, at, n, n_experts, BR=AT_ROWS
    )
    # a key's upper 32 bits are its value's float32 bits (fused_triton_kernel.row_key)
    best = torch.where(keys >= 0, (keys >> 32).to(torch.int32).view(torch.float32), -1.0)
    return ExpertRows(tokens.long(), best[0], at[0], best[1], at[1], counts.long(), y_row)
