"""outlier_hydra: find systematic outlier features (Dettmers et al. 2022) in transformer LMs.

The package is laid out as the pipeline, each room importing only the ones above it here
(docs/architecture.md: the map, and how to add a stage, a model family, a reduction or a subcommand):
  errors, files, lock, figures   the ground floor: one-line errors, atomic writes, the run lock, plots
  config/     typed schema, range checks, allowed `_target_`s, where the config tree lives
  stats/      OutlierStats: plain arrays that merge exactly
  models/     load a checkpoint; its facts; discovery of the hook points; the probe forward
  data/       text stream -> token windows [num_sequences, sequence_length]; the shipped corpus
  collect/    forward hooks that reduce activations on the model's device (backends, kernels)
  stages/     the stage protocol and registry; MoE routing, experts, massive activations, int8 error
  analysis/   criteria -> feature records; the result documents
  output/     summary table, plots, report pages, loggers (W&B)
  pipeline/   prepare and run(cfg), their checks, the run directory, statistics reuse
  launch/     Slurm/local launchers, the VRAM estimate
  registration, tools/   registration with Hydra; the subcommands besides run
  cli.py      the one command line (`outlier-hydra`, `python -m outlier_hydra`): dispatch only
  testing/    tiny models for the tests and the census (never imported by a run)
"""

__version__ = "0.2.0"
