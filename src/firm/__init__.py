"""FIRM: Federated In-client Regularized Multi-objective alignment."""
__version__ = "0.1.0"
