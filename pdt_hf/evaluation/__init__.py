"""Evaluation: the metrics of DESIGN.md ("Metrics"), their confidence intervals, and the sentence encoder.

- ``metrics``: serial fidelity, redundancy (embedding + repeated 4-grams), text coverage, rollback
  rate, speedup, step-cost ratio, note-bus overhead, agreement-head calibration.
- ``stats``: percentile bootstrap intervals, plain and paired.
- ``embeddings``: the offline all-MiniLM-L6-v2 encoder (``sentence_transformers`` is imported only
  when an encoder is loaded).

``pdt eval`` and ``pdt bench`` are built on these, in the order data flows: ``prompt_sets`` (prompts and
plans) -> ``baselines`` (serial, Skeleton-of-Thought, PDT and ablations) -> ``evaluate`` (scores, CIs,
paired differences, calibration) -> ``report`` (markdown, PNG, JSON); ``timing`` -> ``bench`` ->
``bench_report`` for wall-clock runs; ``runtime`` loads the model, ``cli`` registers both commands.
They are imported by module, not re-exported here.
"""

from pdt_hf.evaluation.embeddings import default_encoder_path, load_sentence_encoder
from pdt_hf.evaluation.metrics import (
    calibration,
    coverage_text,
    embedding_redundancy,
    empty_sections,
    note_bus_overhead,
    redundancy,
    repeated_ngram_rate,
    rollback_rate,
    serial_fidelity,
    serial_fidelity_batch,
    speedup,
    split_sentences,
    step_cost_ratio,
    text_covered_items,
)
from pdt_hf.evaluation.stats import bootstrap_ci, paired_difference

__all__ = [
    "bootstrap_ci",
    "calibration",
    "coverage_text",
    "default_encoder_path",
    "embedding_redundancy",
    "empty_sections",
    "load_sentence_encoder",
    "note_bus_overhead",
    "paired_difference",
    "redundancy",
    "repeated_ngram_rate",
    "rollback_rate",
    "serial_fidelity",
    "serial_fidelity_batch",
    "speedup",
    "split_sentences",
    "step_cost_ratio",
    "text_covered_items",
]
