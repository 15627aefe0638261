"""The fire entry point of llama_rewrite.py: flags (rewrite/cli_args.py) -> a checked
Config -> the dry run or the run (rewrite/runner.py)."""
from __future__ import annotations

import sys

import fire

from rewrite.cli_args import check_argv, flags_help, signature, validate
from rewrite.runner import run_cli


def main(**flags) -> None:
    run_cli(validate(flags))


main.__signature__ = signature()
main.__doc__ = f"""Rewrite each line of --prompt_filename into the same line of --output_filename
(or each shard of a .parquet / .tar pattern into the folder --output_filename).

Args:
{flags_help()}
"""


def cli(argv: list[str] | None = None) -> int:
    """fire entry point; bad flags and files end with one clear line, exit status 2;
    Ctrl-C with one line saying what is kept, exit status 130 (128 + SIGINT)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_argv(argv)  # every rank parses its own argv, so every rank stops here
        fire.Fire(main, command=argv, name="llama_rewrite.py")
    except (ValueError, OSError) as e:
        print(f"llama_rewrite.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # runner.Interrupted says what was committed
        print(f"llama_rewrite.py: {e or 'interrupted; committed lines are kept, rerun the same command to resume'}",
              file=sys.stderr)
        return 130
    return 0
