"""Fixtures for the tests and the architecture census: tiny models of any family, planted outliers.
Nothing under outlier_hydra/ outside this package imports it; a run never does."""
