"""Rewrite every caption of a text file with LLaMA in-context learning (LaCLIP).

    cd rewrite
    torchrun --nproc_per_node 1 --master_port 12388 llama_rewrite.py \\
        --ckpt_dir $LLAMA_FOLDER/7b --tokenizer_path $LLAMA_FOLDER/7b/tokenizer.model \\
        --max_batch_size 100 --max_seq_len 400 --prompt_filename text/source.txt \\
        --output_filename text/target.txt --sample_mode chatgpt --temperature 0.9

Also runs as `python llama_rewrite.py ...` (one process) and from the repository root
as `rewrite/llama_rewrite.py`. The flags are listed once, in rewrite/cli_args.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (the original `cd rewrite && torchrun llama_rewrite.py` form), Python puts
    # this file's folder, rewrite/, first on sys.path. Put the repository root there instead:
    # every module then has its one import name (`rewrite.prompts`, never a bare `prompts`).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from rewrite.cli import cli, main  # noqa: E402,F401  (after the bootstrap; main: the library entry)

if __name__ == "__main__":
    sys.exit(cli())
