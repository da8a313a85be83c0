"""Mounting versions as folders: mount, unmount, and the local cache."""

from __future__ import annotations

import click
from strata.catalog import config
from strata.cli import output
from strata.cli.options import command, id_option, json_option, many, name_options
from strata.cli.state import State, describe, pass_state, select
from strata.vfs import mount as mounts


def _size(value: str | None) -> int | None:
    return config.parse_size(value) if value else None


@command("mount")
@id_option()
@name_options()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--foreground", is_flag=True,
              help="Serve in this process until unmounted or interrupted.")
@click.option("--writable", is_flag=True,
              help="Record changes in an overlay that 'strata commit' turns into a child "
                   "version (pending changes survive remounts and crashes).")
@click.option("--overlay", metavar="NAME",
              help="Name the overlay explicitly (default: one per mountpoint).")
@click.option("--cache-size", metavar="SIZE",
              help="Cache limit, e.g. 20G (default: STRATA_CACHE_SIZE, the config file, "
                   "or 10% of the cache disk's free space, at least 1 GiB).")
@pass_state
def mount(state: State, dataset_id, project, name, version, mountpoint, foreground,
          writable, overlay, cache_size):
    """Mount a version at MOUNTPOINT (an empty folder), read-only unless --writable."""
    ds = select(state, dataset_id, project, name, version)
    if not ds.is_final():
        raise click.UsageError(f"version {ds.id} is a draft; close it before mounting")
    size = _size(cache_size)
    if foreground:
        output.info(state.quiet, f"mounting {describe(ds)} at {mountpoint} (Ctrl-C to unmount)")
        mounts.serve_foreground(ds.repo.url, ds.id, mountpoint, cache_size=size,
                                writable=writable, overlay=overlay)
        return
    info, cleaned = mounts.start_background(ds.repo.url, ds.id, mountpoint, cache_size=size,
                                            writable=writable, overlay=overlay)
    if cleaned:
        output.info(state.quiet, cleaned)
    mode = f"writable, overlay {info.overlay}" if info.writable else "read-only"
    output.info(state.quiet, f"mounted {describe(ds)} at {info.mountpoint} ({mode}; "
                             f"server pid {info.pid}, log {info.log})")


@command("unmount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@pass_state
def unmount(state: State, mountpoint):
    """Unmount a strata mount (a stale one left by a killed process is cleaned)."""
    output.info(state.quiet, mounts.unmount(mountpoint))


@click.group("cache")
def cache():
    """The local cache of fetched chunks and files."""


def _info(c) -> dict:
    units, used = c.usage()
    return {"dir": str(c.root), "limit": c.limit, "units": units, "bytes": used,
            "mounts": [m.mountpoint for m in mounts.all_mounts()]}


@cache.command("info")
@json_option
@pass_state
def cache_info(state: State, as_json):
    """Where the cache is, its limit and what it holds."""
    c = mounts.open_cache()
    info = _info(c)
    if state.want_json(as_json):
        output.as_json(info)
        return
    click.echo(f"cache:  {info['dir']}")
    click.echo(f"limit:  {output.format_size(info['limit'])}")
    click.echo(f"used:   {output.format_size(info['bytes'])} in {info['units']} units")
    for m in info["mounts"]:
        click.echo(f"mount:  {m}")


@cache.command("prune")
@click.option("--cache-size", metavar="SIZE", help="Prune down to this size instead.")
@pass_state
def cache_prune(state: State, cache_size):
    """Repair the cache index after crashes and evict down to the limit."""
    c = mounts.open_cache(_size(cache_size))
    added, dropped = c.reconcile()
    freed = c.evict()
    output.info(state.quiet, f"pruned {output.format_size(freed)}; index repaired "
                       f"(+{added} -{dropped})")


@cache.command("clear")
@pass_state
def cache_clear(state: State):
    """Remove every cached unit (running mounts fetch again what they need)."""
    c = mounts.open_cache()
    freed = c.clear()
    output.info(state.quiet, f"cleared {output.format_size(freed)}")


MARKS = {"added": "A", "modified": "M", "removed": "D", "renamed": "R"}


@command("status")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@json_option
@pass_state
def status(state: State, mountpoint, as_json):
    """Pending changes of a writable mount, like 'git status'."""
    st = mounts.control_call(mountpoint, "status")
    if state.want_json(as_json):
        output.as_json(st)
        return
    for c in st["changes"]:
        line = f"{MARKS[c['change']]} {c['path']}"
        if "from" in c:
            line += f" <- {c['from']}"
        click.echo(line)
    what = "nothing to commit" if not st["changes"] else f"{len(st['changes'])} changes"
    extra = " (a commit is in progress: run 'strata commit' to finish it)" \
        if st["committing"] else ""
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
    child = mounts.control_call(mountpoint, "commit", name=name, version=version_label,
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
    n = mounts.control_call(mountpoint, "discard")["discarded"]
    output.info(state.quiet, f"discarded {output.plural(n, 'pending change')}")


COMMANDS = [mount, unmount, cache, status, commit, discard]
