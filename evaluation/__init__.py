"""The paper's downstream evaluation (eval_benchmark.py): dataset readers, cached image features,
zero-shot classification, linear probe, few-shot, retrieval, result files and tables.

docs/benchmark.md describes the protocol and the on-disk layout of every dataset.
"""
