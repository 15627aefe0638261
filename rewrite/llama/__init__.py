"""LLaMA-v1 inference engine for LaCLIP's caption rewriting.

Imported as `llama` (rewrite/ on sys.path, as rewrite/llama_rewrite.py runs it)
or as `rewrite.llama`; the modules import each other relatively so both work.
"""
from .checkpoint import load_generator, load_model, merge_shards, split_state_dict
from .generation import Generator
from .model import ModelArgs, Transformer
from .parallel import ParallelInfo, setup_parallel, teardown_parallel
from .tiny import make_tiny_llama, train_tiny_llama
from .tokenizer import Tokenizer

__all__ = [
    "ModelArgs", "Transformer", "Tokenizer", "Generator", "ParallelInfo", "setup_parallel", "teardown_parallel",
    "load_generator", "load_model", "merge_shards", "split_state_dict", "make_tiny_llama", "train_tiny_llama",
]
