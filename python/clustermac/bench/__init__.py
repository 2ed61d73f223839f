"""Evaluation and demo tooling: datasets, mAP, the real-photo benchmark, the evaluation
pipeline, figures, HTML reports and ``clustermac demo``. Never imported by ``import clustermac``."""
