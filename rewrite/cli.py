"""The fire entry point of llama_rewrite.py: flags (rewrite/cli_args.py) -> a checked
Config -> the dry run or the run (rewrite/runner.py), with engine errors naming flags."""
from __future__ import annotations

import sys

import fire

from common.distributed import launched_as_rank0
from rewrite.cli_args import check_argv, flags_help, signature, validate
from rewrite.launch import flag_names, teardown_parallel
from rewrite.prompts import load_pool
from rewrite.runner import Interrupted, run, write_dry_run


def main(**flags) -> None:
    cfg = validate(flags)
    pool = load_pool(cfg.sample_mode, cfg.examples)
    with flag_names(cfg.ckpt_dir, cfg.tokenizer_path, cfg.model_parallel_size):
        if cfg.dry_run:
            if launched_as_rank0():  # prompts need no model and no other process
                write_dry_run(cfg, pool)
            return
        try:
            run(cfg, pool)
        finally:
            teardown_parallel()


main.__signature__ = signature()
main.__doc__ = f"""Rewrite each line of --prompt_filename into the same line of --output_filename.

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
    except Interrupted as e:
        print(f"llama_rewrite.py: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("llama_rewrite.py: interrupted; committed lines are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0
