"""mlaudit: red-team and audit the training-data security of ML models."""
__version__ = "0.1.0"
