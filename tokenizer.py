"""The CLIP tokenizer where the original LaCLIP layout has it (`from tokenizer import SimpleTokenizer`);
the code is models/clip_tokenizer.py."""
from models.clip_tokenizer import DEFAULT_BPE_PATH, SimpleTokenizer, clean_text

__all__ = ["SimpleTokenizer", "clean_text", "DEFAULT_BPE_PATH"]
