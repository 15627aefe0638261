"""LLaMA inference engine for LaCLIP's caption rewriting.

Depends on torch, fairscale and sentencepiece only, never on the rest of the project:
errors name files, not flags (see errors.py), and process groups are the caller's.
"""
from .checkpoint import load_generator, load_model, merge_shards, split_state_dict
from .errors import CheckpointError, ParallelError, TokenizerError
from .generation import Generator
from .model import ModelArgs, Transformer
from .parallel import ParallelInfo, check_mapping, init_model_parallel, teardown_model_parallel
from .tokenizer import Tokenizer

__all__ = [
    "ModelArgs", "Transformer", "Tokenizer", "Generator", "ParallelInfo", "check_mapping",
    "init_model_parallel", "teardown_model_parallel", "load_generator", "load_model", "merge_shards",
    "split_state_dict", "CheckpointError", "ParallelError", "TokenizerError",
]
