"""Option parsing shared by the commands.

clearml-data takes several values after one flag (`--files a b c`, argparse's nargs='*');
click takes one value per flag. `GreedyOption` marks such options and `StrataCommand`
rewrites `--files a b c` into `--files a --files b --files c` before click parses, so both
spellings work. Greedy consumption stops at the next token that starts with '-' (as in
argparse) and at '--'.
"""

from __future__ import annotations

from typing import Callable

import click


class GreedyOption(click.Option):
    """A repeatable option that also takes several values after one flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)


def expand_greedy(args: list[str], greedy: set[str]) -> list[str]:
    out: list[str] = []
    current: str | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        if token in greedy:
            current = token
            out.append(token)
            if i + 1 < len(args):  # the first value is taken as is, like click does
                out.append(args[i + 1])
                i += 1
        elif current is not None and not (token.startswith("-") and token != "-"):
            out.extend((current, token))
        else:
            current = None
            out.append(token)
        i += 1
    return out


class StrataCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        greedy = {opt for p in self.params if isinstance(p, GreedyOption) for opt in p.opts}
        return super().parse_args(ctx, expand_greedy(list(args), greedy))


def command(name: str | None = None, **kwargs) -> Callable:
    """`click.command` with greedy options; use it for every strata command."""
    kwargs.setdefault("cls", StrataCommand)
    return click.command(name, **kwargs)


def many(*decls: str, **kwargs) -> Callable:
    """A greedy, repeatable option: `--tags a b --tags c` gives ('a', 'b', 'c')."""
    return click.option(*decls, cls=GreedyOption, **kwargs)


def id_option(help: str = "Version id (default: the last dataset you used in this "
                          "repository).", required: bool = False) -> Callable:
    return click.option("--id", "dataset_id", metavar="ID", required=required, help=help,
                        callback=not_empty)


def not_empty(ctx, param, value):
    """An option given as '' (an unset shell variable) is an error, not its default."""
    if value == "":
        raise click.BadParameter("is empty", ctx=ctx, param=param)
    return value


def name_options(version: bool = True) -> Callable:
    """--project/--name (and --version): select a dataset by name instead of by id."""
    def decorate(f: Callable) -> Callable:
        if version:
            f = click.option("--version", "version", metavar="X.Y.Z",
                             help="Version label (default: the latest).")(f)
        f = click.option("--name", "name", help="Dataset name (selects by name; needs "
                                                "--project).")(f)
        f = click.option("--project", "project", help="Dataset project.")(f)
        return f
    return decorate


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON.")(f)
