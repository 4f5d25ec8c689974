"""outlier_hydra: find systematic outlier features (Dettmers et al. 2022) in transformer LMs.

The package is laid out as the pipeline (see the README's Layout section):
  config/     typed schema, explicit registration, checks before anything loads, allowed `_target_`s
  models/     load model + tokenizer; structure.py finds the hook points by structure
  data/       text stream -> token windows [num_sequences, sequence_length]; the shipped corpus
  collect/    forward hooks that reduce activations on the model's device
  stats/      OutlierStats: plain arrays that merge exactly
  analysis/   criteria -> feature records; the result documents
  stages/     optional analyses (MoE routing, massive activations, int8 error), one module each
  pipeline/   run(cfg), the run directory, statistics reuse
  output/     summary table, plots, loggers (W&B)
  launch/     Slurm/local launchers, the sweep-end callback, the VRAM estimate
  tools/      the subcommands besides run: merge, reanalyze, sweep-summary, estimate-vram, benchmark
  cli.py      the one command line (`outlier-hydra`, `python -m outlier_hydra`)
"""

__version__ = "0.2.0"
