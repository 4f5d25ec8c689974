"""Tools: the subcommands besides `run` (merge, reanalyze, sweep-summary, estimate-vram, benchmark)."""
