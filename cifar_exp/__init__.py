"""cifar-exp: small, fast CIFAR-10 CNNs, tracked in MLflow and tuned with Optuna."""

__version__ = "0.1.0"
