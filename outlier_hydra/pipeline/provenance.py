"""Where a job ran (Slurm ids, visible GPUs, versions): provenance, kept out of the results."""

from __future__ import annotations

import os
import platform


def environment() -> dict:
    import torch
    import transformers

    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES")
    return {
        "hostname": platform.node(),
        **{k.lower(): os.environ.get(k) for k in keys},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
