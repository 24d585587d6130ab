"""Figures and tables regenerated from MLflow records alone."""
