"""Recall probes: needle in a haystack, passkey retrieval, retention curves, associative recall.

Generators, scoring and MQAR need only torch; running a HuggingFace model imports transformers,
and plots import matplotlib (optional: ``pip install 'memlayers[plots]'``), each on first use.

Example:
    >>> from memlayers.probes import string_match_all
    >>> string_match_all("The special magic numbers are 1234567.", ["1234567"])
    1.0
"""
from .formats import NEEDLE, NOISE, PASSKEY_LINE
from .generators import NEEDLE_VARIANTS, ProbeSample, needle_sample, passkey_sample, retention_sample
from .haystack import Haystack, depth_grid, parse_size, parse_sizes, prompt_tokens
from .hf import HFResponder, MemoryUnavailableError, ModelLoadError, attach_memory, load_model
from .mqar import MQARBatch, MQARModel, MQARResult, evaluate_mqar, mqar_data, train_mqar
from .plots import plot_curves, plot_heatmap, plots_available, summary_markdown
from .runner import load_records, run_cells, text_evaluator
from .runs import run_mqar, run_needle, run_parametric_retention, run_passkey, run_retention, write_report
from .scoring import string_match_all, string_match_part

__all__ = [
    "NEEDLE", "NOISE", "PASSKEY_LINE", "NEEDLE_VARIANTS", "ProbeSample", "needle_sample", "passkey_sample",
    "retention_sample", "Haystack", "depth_grid", "parse_size", "parse_sizes", "prompt_tokens", "HFResponder",
    "MemoryUnavailableError", "ModelLoadError", "attach_memory", "load_model", "MQARBatch", "MQARModel", "MQARResult", "evaluate_mqar",
    "mqar_data", "train_mqar", "plot_curves", "plot_heatmap", "plots_available", "summary_markdown", "load_records", "run_cells",
    "text_evaluator", "run_mqar", "run_needle", "run_passkey", "run_retention",
    "run_parametric_retention", "write_report",
    "string_match_all", "string_match_part",
]
