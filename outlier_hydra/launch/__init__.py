"""Launch: where jobs run. The Slurm/local launchers, the sweep-end callback, the VRAM estimate."""
