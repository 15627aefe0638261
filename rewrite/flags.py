"""The thin layer on fire that the CLIs of rewrite/ share (llama_rewrite.py, `python -m rewrite.report`).

A CLI writes its flags once, as a frozen dataclass of `flag(default, help)` fields; fire's
signature and help text are made from it (`document`). fire parses argv and binds the values;
what fire lacks is added here, not a second parser: fire binds the flags a function names, runs
it with defaults for the rest and only complains about a leftover after it returns (a whole run
with a mistyped flag ignored), so `run_fire` lets fire bind every flag (**flags) and stray value
(*stray) and `check_names` refuses, before any work, a name that is not a flag (with a
did-you-mean), a stray value, and does fire's -x shortcut (the one flag starting with x), which
**flags turns off. The `as_*` coercions check the values fire bound: fire hands over whatever was
typed ("abc" stays a str, a bare flag is True).
"""
from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Optional

import fire
from fire.parser import SeparateFlagArgs

HELP_FLAGS = ("-h", "--help")


def flag(default: Any, help: str) -> Any:
    """A dataclass field that is a CLI flag: its default and its help line."""
    return field(default=default, metadata={"help": help})


def _flag_names(config: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every flag, the switches: flags whose default is a bool, which fire also reads as --noflag)."""
    return (tuple(f.name for f in fields(config)),
            tuple(f.name for f in fields(config) if isinstance(f.default, bool)))


def _typed(key: str, argv: Sequence[str]) -> str:
    """The flag as it was typed (--max-batchsize), for messages: fire hands over max_batchsize."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if arg.startswith("-") and name.lstrip("-").replace("-", "_") in (key, f"no{key}"):
            return name
    return f"--{key}"


def _flag_name(config: type, key: str, argv: Sequence[str]) -> str:
    """fire's key -> the flag it names (-x: the one flag starting with x), or a one-line refusal."""
    names, switches = _flag_names(config)
    matches = [name for name in names if name[0] == key] if len(key) == 1 else [key]
    if len(matches) > 1:
        raise ValueError(f"flag {_typed(key, argv)} is ambiguous: it could be --" + ", --".join(matches))
    if matches and matches[0] in names:
        return matches[0]
    typed = _typed(key, argv)
    close = difflib.get_close_matches(typed.lstrip("-").replace("-", "_"), names + tuple(f"no{b}" for b in switches),
                                      n=1, cutoff=0.6)
    hint = f"did you mean --{close[0]}?" if close else "the flags are --" + ", --".join(names)
    raise ValueError(f"unknown flag {typed}; {hint}")


def _is_flag(arg: str) -> bool:
    """fire's rule: '--anything', or '-' and a letter ('-0.5' is a value)."""
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None


def _stray_owners(argv: Sequence[str]) -> list[Optional[str]]:
    """For each value fire leaves unbound (its *stray, in argv's order), the key of the flag it
    follows: --rewrites a.txt b.txt binds rewrites=a.txt and leaves b.txt after 'rewrites'.
    None for a value after a --flag=value or before any flag. fire's own rule for which token
    is a flag's value: the next one, unless the flag has '=' or the next token is a flag."""
    args, owners, owner, i = SeparateFlagArgs(list(argv))[0], [], None, 0
    while i < len(args):
        if _is_flag(args[i]):
            takes = "=" not in args[i] and i + 1 < len(args) and not _is_flag(args[i + 1])
            owner = args[i].lstrip("-").replace("-", "_") if takes else None
            i += 2 if takes else 1
        else:
            owners.append(owner)
            i += 1
    return owners


def check_names(config: type, flags: dict[str, Any], stray: Sequence[Any] = (), argv: Sequence[str] = (),
                multi: Sequence[str] = ()) -> dict[str, Any]:
    """What fire bound -> the flags by their `config` names, refused before any work if a name
    is not a flag or a value follows none. A flag of `multi` takes the values typed after it
    (--rewrites a.txt b.txt -> rewrites=['a.txt', 'b.txt']): fire binds the first, leaves the
    others stray, and they are given back to it here."""
    named = {_flag_name(config, key, argv): value for key, value in flags.items()}
    owners = _stray_owners(argv)
    if len(owners) != len(stray):  # argv is not what fire read: no value can be placed
        owners = [None] * len(stray)
    for owner, value in zip(owners, stray):
        name = None if owner is None or owner not in flags else _flag_name(config, owner, argv)
        if name not in multi:
            raise ValueError(f"unexpected argument {value!r}: every value follows its flag "
                             "(--name value or --name=value)")
        first = named[name]
        named[name] = [*(first if isinstance(first, (list, tuple)) else [first]), value]
    return named


def signature(config: type) -> inspect.Signature:
    """main(*, flag=default, ...): what fire reads to accept and list the flags (keyword-only,
    so fire passes them by name to main(**flags))."""
    return inspect.Signature([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          default=str(f.default) if isinstance(f.default, Path) else f.default)
        for f in fields(config)])


def flags_help(config: type) -> str:
    """The docstring's Args section, which fire shows as each flag's help."""
    return "\n".join(f"    {f.name}: {f.metadata['help']}" for f in fields(config))


def document(main: Callable, config: type, summary: str) -> None:
    """Give main(**flags) the signature and docstring fire's --help shows."""
    main.__signature__ = signature(config)
    main.__doc__ = f"{summary}\n\nArgs:\n{flags_help(config)}\n"


def run_fire(main: Callable, config: type, argv: Sequence[str], name: str, multi: Sequence[str] = ()) -> int:
    """fire parses argv for main(**flags) (documented with `document`): --help wherever it stands
    shows the flags; unknown names are refused before main runs. Bad flags and files
    (ValueError, OSError) end with one line naming them, exit status 2."""
    argv = list(argv)

    def checked_run(*stray, **flags) -> None:  # every rank binds its own argv, so every rank stops here
        main(**check_names(config, flags, stray, argv, multi))

    try:
        if any(a in HELP_FLAGS for a in argv):
            fire.Fire(main, command=["--help"], name=name)
        else:
            fire.Fire(checked_run, command=argv, name=name)
    except (ValueError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def as_int(flag: str, value: object, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--{flag} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"--{flag} must be {bound}, got {value}")
    return value


def as_float(flag: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{flag} must be a number, got {value!r}")
    return float(value)


def as_switch(flag: str, value: object) -> bool:
    if not isinstance(value, bool):  # fire binds the token after a bare switch to it
        raise ValueError(f"--{flag} is a switch: give it alone (or --{flag}=False), got {value!r}")
    return value


def as_optional_str(value: object) -> Optional[str]:
    return None if value is None else str(value)
