"""The fire entry point of llama_rewrite.py: fire parses the flags (rewrite/flags.py's
`run_fire`), rewrite/cli_args.py checks what it bound -> a Config -> the dry run or the run
(rewrite/runner.py)."""
from __future__ import annotations

import sys

from rewrite.cli_args import Config, validate
from rewrite.flags import document, run_fire
from rewrite.runner import run_cli


def main(**flags) -> None:
    run_cli(validate(flags))


document(main, Config, """Rewrite each line of --prompt_filename into the same line of --output_filename
(or each shard of a .parquet / .tar pattern into the folder --output_filename).""")


def cli(argv: list[str] | None = None) -> int:
    """fire entry point; bad flags and files end with one clear line, exit status 2;
    Ctrl-C with one line saying what is kept, exit status 130 (128 + SIGINT)."""
    try:
        return run_fire(main, Config, sys.argv[1:] if argv is None else argv, "llama_rewrite.py")
    except KeyboardInterrupt as e:  # runner.Interrupted says what was committed
        print(f"llama_rewrite.py: {e or 'interrupted; committed lines are kept, rerun the same command to resume'}",
              file=sys.stderr)
        return 130
