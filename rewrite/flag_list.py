"""A fire CLI's flags written once, as a dataclass: the fire signature, the help text and the
check of argv (unknown flags refused before any work) are made from its fields.

The same rules as llama_rewrite.py's flags (rewrite/cli_args.py, whose check_argv is bound to
its own Config): fire binds the flags it knows, runs main with defaults for the rest and only
complains about a leftover after main returns, so a mistyped flag would be ignored for a whole
run. `FlagList(Config).check_argv(argv)` refuses it first. Reads argv as fire does: --a_b or
--a-b, --flag=value or --flag value, a bare --flag (True) or --noflag (False), -x for the one
flag starting with x; after a lone '--' come fire's own flags. Flags listed in `multi` take
several values (--rewrites a.txt b.txt), handed to fire as one comma list.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

HELP_FLAGS = ("-h", "--help")


def is_flag(arg: str) -> bool:
    """fire's rule: '--anything', or '-' and a letter ('-0.5' is a value)."""
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None


def _key(arg: str) -> str:
    return arg.lstrip("-").split("=", 1)[0].replace("-", "_")


class FlagList:
    def __init__(self, config: type, multi: Sequence[str] = ()) -> None:
        self.config = config
        self.names = tuple(f.name for f in fields(config))
        self.switches = tuple(f.name for f in fields(config) if isinstance(f.default, bool))
        self.multi = tuple(multi)

    def _check_flag(self, arg: str, key: str, bare: bool) -> None:
        if key in self.names or (bare and key.startswith("no") and key[2:] in self.switches):
            return
        typed = arg.split("=", 1)[0]
        if len(key) == 1:  # fire's shortcut: -p for the one flag starting with p
            matches = [name for name in self.names if name[0] == key]
            if len(matches) == 1:
                return
            if matches:
                raise ValueError(f"flag {typed} is ambiguous: it could be --" + ", --".join(matches))
        close = difflib.get_close_matches(key, self.names + tuple(f"no{b}" for b in self.switches), n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else "the flags are --" + ", --".join(self.names)
        raise ValueError(f"unknown flag {typed}; {hint}")

    def gather(self, argv: Sequence[str]) -> list[str]:
        """--rewrites a b c (a flag of `multi` followed by several values) -> --rewrites=a,b,c."""
        args, out, i = list(argv), [], 0
        while i < len(args):
            arg = args[i]
            if is_flag(arg) and "=" not in arg and _key(arg) in self.multi:
                j = i + 1
                while j < len(args) and not is_flag(args[j]) and args[j] != "--":
                    j += 1
                if j - i > 2:
                    out.append(f"--{_key(arg)}=" + ",".join(args[i + 1:j]))
                    i = j
                    continue
            out.append(arg)
            i += 1
        return out

    def check_argv(self, argv: Sequence[str]) -> None:
        """Refuse, before any work, what fire would not bind (see the module's docstring)."""
        args = list(argv)
        if "--" in args:
            args = args[:len(args) - 1 - args[::-1].index("--")]
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in HELP_FLAGS:
                i += 1
                continue
            if not is_flag(arg):
                raise ValueError(f"unexpected argument {arg!r}: every value follows its flag "
                                 "(--name value or --name=value)")
            has_value = "=" in arg
            bare = not has_value and (i + 1 == len(args) or is_flag(args[i + 1]))
            self._check_flag(arg, _key(arg), bare)
            i += 1 if has_value or bare else 2

    def signature(self) -> inspect.Signature:
        """main(*, flag=default, ...): keyword-only, so fire passes every flag by name."""
        return inspect.Signature([
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                              default=str(f.default) if isinstance(f.default, Path) else f.default)
            for f in fields(self.config)])

    def help(self) -> str:
        """The docstring's Args section, which fire shows as each flag's help."""
        return "\n".join(f"    {f.name}: {f.metadata['help']}" for f in fields(self.config))
