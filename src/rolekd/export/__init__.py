"""Shipping a trained model: ``rolekd export`` writes a finished run's model as ONNX with its real bit widths
(integer weight codes, QuantizeLinear/DequantizeLinear activations), checked by onnxruntime, and its size at
the true bit widths. It sits beside the pipeline and the report (it rebuilds a run's model through
:mod:`rolekd.experiment`); nothing below it imports it. onnx/onnxruntime: ``pip install "rolekd[export]"``."""

from .size import config_size, megabytes, model_size, num_classes_of, size_cell
from .to_onnx import (INPUT, OPSET, OUTPUT, Run, build_onnx, describe, export_ready, export_run, load_run,
                      ort_session, size_path, weight_code)

__all__ = ["INPUT", "OPSET", "OUTPUT", "Run", "build_onnx", "config_size", "describe", "export_ready", "export_run",
           "load_run", "megabytes", "model_size", "num_classes_of", "ort_session", "size_cell", "size_path",
           "weight_code"]
