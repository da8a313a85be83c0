"""Mounting versions as folders, and the local cache. The commands that act on a live
mount (status, commit, discard, unmount) are in commands_control."""

from __future__ import annotations

import click
from strata.catalog import config
from strata.catalog.errors import WrongState
from strata.cli import output
from strata.cli.errors import CheckFailed
from strata.cli.options import command, id_option, json_option, name_options
from strata.cli.state import State, describe, pass_state, select
from strata.vfs import mount as mounts


def _size(value: str | None) -> int | None:
    return config.parse_size(value) if value else None


@command("mount")
@id_option()
@name_options()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--all", "all_versions", is_flag=True,
              help="Mount every version of the repository, read-only: "
                   "MOUNTPOINT/by-id/ID/ and MOUNTPOINT/by-name/PROJECT/NAME/VERSION "
                   "(and .../latest), each resolved when first read.")
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
def mount(state: State, dataset_id, project, name, version, mountpoint, all_versions,
          foreground, writable, overlay, cache_size):
    """Mount a version at MOUNTPOINT (an empty folder), read-only unless --writable;
    or, with --all, every version of the repository."""
    size = _size(cache_size)
    if all_versions:
        if dataset_id or project or name or version:
            raise click.UsageError("--all mounts every version; drop --id, --project, "
                                   "--name and --version")
        if writable or overlay:
            raise click.UsageError("--all is read-only; mount one version with "
                                   "--writable to change it")
        from strata.catalog.repo import open_repo
        repo, vid = open_repo(state.repo), mounts.ALL_VERSIONS
        what = f"every version of {repo.url}"
    else:
        ds = select(state, dataset_id, project, name, version)
        if not ds.is_final():
            raise WrongState(f"version {ds.id} is a draft; close it before mounting")
        repo, vid, what = ds.repo, ds.id, describe(ds)
    if foreground:
        output.info(state.quiet, f"mounting {what} at {mountpoint} (Ctrl-C to unmount)")
        mounts.serve_foreground(repo.url, vid, mountpoint, cache_size=size,
                                writable=writable, overlay=overlay)
        return
    # fork: this process has nothing left to do but print and exit, so the server is
    # forked from it rather than started as a second interpreter (strata.vfs.mount)
    info, cleaned = mounts.start_background(repo, vid, mountpoint, cache_size=size,
                                            writable=writable, overlay=overlay,
                                            fork=True, version_known=True)
    if cleaned:
        output.info(state.quiet, cleaned)
    mode = f"writable, overlay {info.overlay}" if info.writable else "read-only"
    output.info(state.quiet, f"mounted {what} at {info.mountpoint} ({mode}; "
                             f"server pid {info.pid}, log {info.log})")


@click.group("cache")
def cache():
    """The local cache of fetched chunks and files."""


def _info(c) -> dict:
    from strata.catalog.materialize import copies_usage
    units, used = c.usage()
    whole, whole_bytes = c.whole_usage()
    copies, copies_bytes = copies_usage(c.root)
    return {"dir": str(c.root), "limit": c.limit, "units": units, "bytes": used,
            "whole_files": whole, "whole_bytes": whole_bytes,
            "copies": copies, "copies_bytes": copies_bytes,
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
    if info["whole_files"]:
        n = info["whole_files"]
        click.echo(f"whole:  {n} file{'' if n == 1 else 's'} kept whole "
                   f"({output.format_size(info['whole_bytes'])}), read by the kernel itself")
    if info["copies"]:
        n = info["copies"]
        click.echo(f"copies: {n} version{'' if n == 1 else 's'} got with `strata get` "
                   f"({output.format_size(info['copies_bytes'])}, outside the limit)")
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


@cache.command("verify")
@pass_state
def cache_verify(state: State):
    """Hash every cached unit and whole file again; remove the damaged ones (exit 1)."""
    c = mounts.open_cache()
    checked, size, damaged, unchecked = c.verify()
    for unit in damaged:
        click.echo(f"removed damaged {unit}")
    note = f"; {unchecked} whole files made by an older strata not checked" if unchecked \
        else ""
    summary = (f"checked {checked} units ({output.format_size(size)}): "
               f"{len(damaged) or 'none'} damaged{note}")
    if damaged:
        raise CheckFailed(summary + " (removed: they are fetched again when read; running "
                                    "mounts may hold them in memory until remounted)")
    output.info(state.quiet, summary)


@cache.command("clear")
@pass_state
def cache_clear(state: State):
    """Remove every cached unit (running mounts fetch again what they need) and the
    read-only copies `strata get` made."""
    from strata.catalog.materialize import clear_copies
    c = mounts.open_cache()
    freed = c.clear()
    copies = clear_copies(c.root)
    output.info(state.quiet, f"cleared {output.format_size(freed + copies)}"
                             + (f" (copies: {output.format_size(copies)})" if copies else ""))


COMMANDS = [mount, cache]
