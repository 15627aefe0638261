"""LLaMA inference engine for LaCLIP's caption rewriting.

Depends on torch, fairscale, sentencepiece, tokenizers and safetensors only, never on the
rest of the project: errors name files, not flags (see errors.py), and process groups
are the caller's. Loads Meta's folders (LLaMA-1/2/3) and Hugging Face's (formats.py), and
converts the former to the latter for engines that load only those (hf_export.py).
"""
from .checkpoint import load_generator, load_model, load_rank_state
from .errors import CheckpointError, ParallelError, TokenizerError
from .formats import default_dtype, find_tokenizer, load_tokenizer, open_checkpoint
from .generation import Generator
from .hf_export import HFExport, export_hf
from .meta import split_state_dict
from .model import ModelArgs, Transformer
from .parallel import ParallelInfo, check_mapping, init_model_parallel, teardown_model_parallel
from .sentencepiece_tokenizer import Tokenizer, TokenizerBase

__all__ = [
    "ModelArgs", "Transformer", "Tokenizer", "TokenizerBase", "load_tokenizer", "find_tokenizer", "Generator",
    "ParallelInfo", "check_mapping", "init_model_parallel", "teardown_model_parallel", "load_generator",
    "load_model", "load_rank_state", "open_checkpoint", "export_hf", "HFExport", "default_dtype", "split_state_dict",
    "CheckpointError", "ParallelError", "TokenizerError",
]
