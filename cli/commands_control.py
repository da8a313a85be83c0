"""Acting on a live mount: status, commit and discard of a writable mount's pending
changes (one request over its control socket), and unmount.

These import the mount registry and the control channel only, not the filesystem or the
Dataset API: each of them is a short request, and process start-up is most of its time.
"""

from __future__ import annotations

import click
from strata.cli import output
from strata.cli.options import command, json_option, many
from strata.cli.state import State, pass_state
from strata.vfs import registry


@command("unmount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@pass_state
def unmount(state: State, mountpoint):
    """Unmount a strata mount (a stale one left by a killed process is cleaned)."""
    output.info(state.quiet, registry.unmount(mountpoint))


MARKS = {"added": "A", "modified": "M", "removed": "D", "renamed": "R"}


@command("status")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@json_option
@pass_state
def status(state: State, mountpoint, as_json):
    """Pending changes of a writable mount, like 'git status'."""
    st = registry.control_call(mountpoint, "status")
    if state.want_json(as_json):
        output.as_json(st)
        return
    frozen = st.get("committing_changes", [])   # frozen by a commit that did not finish
    for c in frozen + st["changes"]:
        line = f"{MARKS[c['change']]} {output.shown(c['path'])}"
        if "from" in c:
            line += f" <- {output.shown(c['from'])}"
        output.result(line)
    total = len(frozen) + len(st["changes"])
    what = "nothing to commit" if not total else f"{total} changes"
    extra = f" ({len(frozen)} of them in a commit in progress: run 'strata commit' to " \
        f"finish it)" if st["committing"] else ""
    output.info(state.quiet, f"on version {st['base']}: {what}{extra}")


@command("commit")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--name", help="Dataset name of the child (default: the mounted one's).")
@click.option("--version", "version_label", metavar="LABEL",
              help="Version label of the child (default: the next patch).")
@click.option("-m", "--description", help="Description of the child version.")
@many("--tags", "tags", metavar="TAG...", help="Tags of the child version.")
@pass_state
def commit(state: State, mountpoint, name, version_label, description, tags):
    """Turn a writable mount's pending changes into a child version; the mount then
    shows the child with no pending changes. Prints the new id on the last line."""
    child = registry.control_call(mountpoint, "commit", name=name, version=version_label,
                                description=description, tags=list(tags) or None)
    output.info(state.quiet, f"committed {child['project']}/{child['name']} "
                             f"{child['version']}: {child['files']} files; "
                             f"{mountpoint} now shows it")
    output.result(child["id"])


@command("discard")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@pass_state
def discard(state: State, mountpoint):
    """Drop a writable mount's pending changes."""
    n = registry.control_call(mountpoint, "discard")["discarded"]
    output.info(state.quiet, f"discarded {output.plural(n, 'pending change')}")


COMMANDS = [status, commit, discard, unmount]
