"""The `strata` command group, its global options, and the error boundary.

Errors are translated here and nowhere else (STYLE.md 9):
    StrataError (a user mistake or a repository state)  -> one line on stderr, exit 1
    OSError from the local machine (disk full, ...)     -> one line on stderr, exit 1
    click usage errors                                  -> click's message, exit 2
    any other exception (a bug)                         -> one line + hint, exit 3
    KeyboardInterrupt                                   -> one line, exit 130
--debug adds the traceback before the line.

Commands live in `commands_*` modules, each exporting COMMANDS (a list of click commands
or groups); a module joins the CLI by being listed in COMMAND_MODULES with the names of
its commands. A module is imported only when one of its commands runs (`strata --help`
imports them all to show their help): process start-up is most of the time of a short
command such as `strata status`, and the modules import what their commands need.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
from strata import __version__
from strata.cli.errors import CheckFailed
from strata.cli.options import StrataCommand, not_empty
from strata.cli.state import State
from strata.storage.errors import StrataError, disk_full

EXIT_ERROR = 1
EXIT_BUG = 3
EXIT_INTERRUPTED = 130

COMMAND_MODULES = {
    "strata.cli.commands_build": ("create", "add", "remove", "upload", "close", "sync"),
    "strata.cli.commands_read": ("list", "search", "compare", "log", "verify", "get"),
    "strata.cli.commands_manage": ("delete", "squash", "publish", "set-description", "tag",
                                   "metadata", "rename", "move", "gc", "repo"),
    "strata.cli.commands_mount": ("mount", "cache"),
    "strata.cli.commands_control": ("status", "commit", "discard", "unmount"),
}
MODULE_OF = {name: module for module, names in COMMAND_MODULES.items() for name in names}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class StrataGroup(click.Group):
    command_class = StrataCommand

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(MODULE_OF))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in MODULE_OF:
            load_commands(self, MODULE_OF[name])
        elif name not in MODULE_OF:   # a typo: click suggests names from self.commands
            for module in COMMAND_MODULES:
                load_commands(self, module)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context):
        try:
            rv = super().invoke(ctx)
            if isinstance(ctx.obj, State):
                ctx.obj.remember_touched()
            return rv
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CheckFailed as e:
            self._fail(ctx, EXIT_ERROR, one_line(e), show_traceback=False)
        except StrataError as e:
            self._fail(ctx, EXIT_ERROR, one_line(e) or type(e).__name__)
        except KeyboardInterrupt:
            click.echo("strata: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # the reader of our stdout went away (`strata list | head`): stop quietly
            try:  # so that Python's flush of stdout at exit does not complain again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            ctx.exit(EXIT_ERROR)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            self._fail(ctx, EXIT_ERROR, f"{e.strerror or one_line(e)}{where}")
        except Exception as e:  # a bug: say so in one line, traceback on request
            if disk_full(e):   # a local database (a draft, the cache index)
                self._fail(ctx, EXIT_ERROR, f"No space left on device ({one_line(e)})")
            detail = one_line(f"{type(e).__name__}: {e}")
            hint = "" if _debug(ctx) else "; run with --debug for the traceback"
            self._fail(ctx, EXIT_BUG, f"internal error ({detail}){hint}")

    @staticmethod
    def _fail(ctx: click.Context, code: int, message: str, show_traceback: bool = True):
        if show_traceback and _debug(ctx):
            import traceback
            traceback.print_exc()
        click.echo(f"strata: error: {message}", err=True)
        ctx.exit(code)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug"))


def load_commands(group: click.Group, module: str) -> None:
    for command in importlib.import_module(module).COMMANDS:
        group.add_command(command)


@click.group(cls=StrataGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", metavar="URL", callback=not_empty,
              help="Repository URL (default: $STRATA_REPO, then the config file, then the "
                   "embedded local repository).")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output for list, search, compare, verify, log.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no chatter.")
@click.version_option(__version__, prog_name="strata")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, as_json: bool, debug: bool, quiet: bool):
    """strata: versioned datasets that mount as plain folders.

    A superset of clearml-data. Build a version with create, add/remove or sync, then
    close; read it with list, get, verify, compare and log.
    """
    ctx.obj = State(repo=repo, json=as_json, debug=debug, quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="strata")


if __name__ == "__main__":
    main()
