"""The engine's errors. Messages name the files involved but no command-line flag: the
CLI that called the engine knows which flag gave which path and adds it."""


class CheckpointError(ValueError):
    """A checkpoint folder or shard that cannot be used (missing, malformed, mismatched)."""


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used."""


class ParallelError(ValueError):
    """A model-parallel layout that cannot load the checkpoint."""
