"""Training (needs the ``train`` extra: torch, scikit-learn, onnx). The runtime never imports this package."""

from .train import TrainResult, train_bundle

__all__ = ["TrainResult", "train_bundle"]
