"""Optuna studies whose objective calls experiments.fit()."""
