"""FIRM: Federated In-client Regularized Multi-objective alignment.

    from firm import FirmConfig, train
    result = train(FirmConfig(num_clients=2, num_rounds=1))

``FirmConfig`` and ``train`` load on first use, so ``import firm`` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["FirmConfig", "TrainResult", "TrainingStopped", "train", "__version__"]


def __getattr__(name: str):
    if name == "FirmConfig":
        from firm.config import FirmConfig

        return FirmConfig
    if name in ("train", "TrainResult", "TrainingStopped"):
        from firm import api

        return getattr(api, name)
    raise AttributeError(f"module 'firm' has no attribute {name!r}")
