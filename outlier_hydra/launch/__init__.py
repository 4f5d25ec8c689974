"""Launch: where jobs run. The Slurm and local launchers (launcher.py), what the Slurm controller says
(slurm.py), and the VRAM estimate that sizes a request (vram.py)."""
