"""Encoders to ONNX: the trained Transformer, or a PCA projection (the baseline), with a dynamic batch axis.

Both graphs take the runtime's inputs (``waveforms`` (B, T, K) in noise units;
the Transformer also ``positions`` (B, K, 2) in um) and give ``latent`` (B, D).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import RtsortError
from ..features import LATENT_OUTPUT, POSITIONS_INPUT, WAVEFORMS_INPUT, Encoder
from .model import SpikeEncoder

log = logging.getLogger("rtsort.train")

OPSET = 17
PARITY_TOL = 1e-4


def export_encoder(encoder: SpikeEncoder, path: str | Path, example_x: np.ndarray, example_p: np.ndarray) -> float:
    """Write ``encoder`` to ONNX and check onnxruntime against torch on the examples; return max |difference|."""
    path = Path(path)
    encoder = encoder.eval()
    x = torch.from_numpy(np.ascontiguousarray(example_x[:64], dtype=np.float32))
    p = torch.from_numpy(np.ascontiguousarray(example_p[:64], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (x, p), str(path), dynamo=False, opset_version=OPSET,
            input_names=[WAVEFORMS_INPUT, POSITIONS_INPUT], output_names=[LATENT_OUTPUT],
            dynamic_axes={WAVEFORMS_INPUT: {0: "batch"}, POSITIONS_INPUT: {0: "batch"}, LATENT_OUTPUT: {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)))
    with torch.no_grad():
        ref = encoder(x, p).numpy()
    got = Encoder(path)(x.numpy(), p.numpy())
    diff = float(np.abs(ref - got).max())
    if not diff <= PARITY_TOL:
        raise RtsortError(f"{path}: onnxruntime differs from torch by {diff:.2e} (> {PARITY_TOL:g})")
    log.info("encoder exported to %s (onnxruntime vs torch: max |difference| %.1e)", path, diff)
    return diff


def export_linear(mean: np.ndarray, components: np.ndarray, path: str | Path) -> None:
    """A PCA encoder: latent = (flatten(waveforms) - mean) @ components.T, as an ONNX graph."""
    t, k = mean.shape
    d = components.shape[0]
    nodes = [
        helper.make_node("Reshape", [WAVEFORMS_INPUT, "flat_shape"], ["flat"]),
        helper.make_node("Sub", ["flat", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "weights"], [LATENT_OUTPUT]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, t * k], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(mean.reshape(-1).astype(np.float32), "mean"),
        numpy_helper.from_array(np.ascontiguousarray(components.T, dtype=np.float32), "weights"),
    ]
    graph = helper.make_graph(
        nodes, "pca_encoder",
        [helper.make_tensor_value_info(WAVEFORMS_INPUT, TensorProto.FLOAT, ["batch", t, k])],
        [helper.make_tensor_value_info(LATENT_OUTPUT, TensorProto.FLOAT, ["batch", d])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtsort")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
