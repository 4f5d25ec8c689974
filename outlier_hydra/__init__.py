"""outlier_hydra: find systematic outlier features (Dettmers et al. 2022) in transformer LMs.

Pipeline, one module per stage:
  schema.py / validate.py    typed config, checked before anything heavy loads
  models/                    load model + tokenizer; adapters map a family to its hook points
  data.py                    text stream -> token windows [num_sequences, sequence_length]
  collect.py                 forward hooks that reduce activations on the model's device
  stats.py                   OutlierStats: plain arrays that merge exactly
  analysis.py                OutlierStats + criteria -> feature records
  report.py                  JSON files, summary table
  run.py                     run(cfg): the whole job, callable from tests
"""

__version__ = "0.1.0"
