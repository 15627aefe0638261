"""The fire entry point of llama_rewrite.py: fire parses the flags, rewrite/cli_args.py checks
what it bound -> a Config -> the dry run or the run (rewrite/runner.py)."""
from __future__ import annotations

import sys

import fire

from rewrite.cli_args import HELP_FLAGS, check_names, flags_help, signature, validate
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

    def checked_run(*stray, **flags) -> None:  # every rank binds its own argv, so every rank stops here
        run_cli(validate(check_names(flags, stray, argv)))

    try:
        if any(a in HELP_FLAGS for a in argv):  # wherever it stands; main's signature lists the flags
            fire.Fire(main, command=["--help"], name="llama_rewrite.py")
        else:  # fire parses and binds every flag, checked_run refuses the unknown ones before any work
            fire.Fire(checked_run, command=argv, name="llama_rewrite.py")
    except (ValueError, OSError) as e:
        print(f"llama_rewrite.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # runner.Interrupted says what was committed
        print(f"llama_rewrite.py: {e or 'interrupted; committed lines are kept, rerun the same command to resume'}",
              file=sys.stderr)
        return 130
    return 0
