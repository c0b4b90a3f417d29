"""Benchmarks against peers (``ondevice bench``) and drift across backends and quantizations
(``ondevice eval``), as library functions the CLI calls."""

from .common import BenchError, model_variant, weight_bytes_per_token
from .evaluate import Spec, Thresholds, format_eval, run_eval
from .run import BenchSettings, format_report, measure_bandwidth, run_bench

__all__ = ["BenchError", "BenchSettings", "Spec", "Thresholds", "format_eval", "format_report",
           "measure_bandwidth", "model_variant", "run_bench", "run_eval",
           "weight_bytes_per_token"]
