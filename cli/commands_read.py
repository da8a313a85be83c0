"""Reading versions: list, search, compare, log, verify, get."""

from __future__ import annotations

import os
import shutil

import click
from strata.catalog import ops, paths
from strata.catalog.dataset import Dataset
from strata.catalog.errors import TargetNotEmpty
from strata.catalog.materialize import check_destination
from strata.cli import output
from strata.cli.errors import CheckFailed
from strata.cli.options import command, id_option, json_option, many, name_options
from strata.cli.state import State, describe, pass_state, select

CHANGES = {"A": "added", "M": "modified", "D": "removed"}


# ---- list ------------------------------------------------------------------------------
def _filtered(candidates: list[str], patterns: tuple[str, ...]) -> list[str]:
    """The paths Dataset.list_files(pattern) would keep, for paths not in the view
    (removed ones), which list_files cannot see."""
    keep = set()
    for raw in patterns:
        pattern = paths.clean(raw, allow_root=True)
        for p in candidates:
            if (paths.matches(p, pattern, recursive=True) if paths.has_magic(pattern)
                    else paths.is_under(p, pattern)):
                keep.add(p)
    return sorted(keep)


@command("list")
@id_option()
@name_options()
@many("--filter", "patterns", metavar="PATTERN...",
      help="Only paths matching these wildcards or under these folders.")
@click.option("--modified", is_flag=True,
              help="Only what this version changed: A added, M modified, D removed.")
@json_option
@pass_state
def list_(state: State, dataset_id, project, name, version, patterns, modified, as_json):
    """List the files of a version (size and path)."""
    ds = select(state, dataset_id, project, name, version)
    files = ds.view().files
    if patterns:
        shown = sorted({p for pat in patterns for p in ds.list_files(pat)})
    else:
        shown = ds.list_files()
    if modified:  # rows are (mark, size, path)
        added, changed, removed = ds.changes()
        wanted = set(shown)
        gone = _filtered(removed, patterns) if patterns else removed
        parent = ds.parent_view().files
        rows = ([("A", files[p].size, p) for p in added if p in wanted]
                + [("M", files[p].size, p) for p in changed if p in wanted]
                + [("D", parent[p].size, p) for p in gone])
        rows.sort(key=lambda r: r[2])
    else:
        rows = [(None, files[p].size, p) for p in shown]
    if state.want_json(as_json):
        output.as_json([{"path": p, "size": size, **({"change": CHANGES[m]} if m else {})}
                        for m, size, p in rows])
        return
    for mark, size, p in rows:
        prefix = f"{mark} " if mark else ""
        output.result(f"{prefix}{output.format_size(size):>10}  {output.shown(p)}")
    total = sum(size for mark, size, _ in rows if mark != "D")
    output.info(state.quiet, f"{output.plural(len(rows), 'file')}, "
                             f"{output.format_size(total)} in {describe(ds)}")


# ---- search ----------------------------------------------------------------------------
@command("search")
@click.option("--project", help="Only this project (and its sub-projects).")
@click.option("--name", help="Only names containing this text.")
@many("--tags", metavar="TAG...", help="Only versions with all these tags.")
@many("--ids", metavar="ID...", help="Only these version ids.")
@click.option("--all", "include_drafts", is_flag=True,
              help="Include drafts of this workspace.")
@json_option
@pass_state
def search(state: State, project, name, tags, ids, include_drafts, as_json):
    """Search the versions of the repository."""
    found = Dataset.list_datasets(project, partial_name=name, tags=list(tags) or None,
                                  ids=list(ids) or None, only_completed=not include_drafts,
                                  repo=state.repo)
    if state.want_json(as_json):
        output.as_json(found)
        return
    headers = ("id", "project", "name", "version", "state", "files", "size", "tags")
    rows = [(d["id"], d["project"], d["name"], d["version"], d["state"], d.get("files"),
             output.format_size(d.get("size")), ",".join(d["tags"])) for d in found]
    if rows:
        output.results(output.table(headers, rows, right=("files", "size")))
    output.info(state.quiet, f"{output.plural(len(rows), 'version')} found")


# ---- compare ---------------------------------------------------------------------------
@command("compare")
@click.option("--source", required=True, metavar="ID", help="The version to compare from.")
@click.option("--target", required=True, metavar="ID", help="The version to compare to.")
@click.option("--verbose", is_flag=True, help="List every changed path (A/M/D).")
@json_option
@pass_state
def compare(state: State, source, target, verbose, as_json):
    """What changes from one version to another."""
    result = ops.compare(Dataset.get(source, repo=state.repo),
                         Dataset.get(target, repo=state.repo))
    if state.want_json(as_json):
        output.as_json({"source": source, "target": target, **result.as_dict()})
        return
    if verbose:
        rows = ([("A", p) for p in result.added] + [("M", p) for p in result.modified]
                + [("D", p) for p in result.removed])
        for mark, p in sorted(rows, key=lambda r: r[1]):
            output.result(f"{mark} {output.shown(p)}")
    output.result(f"added {len(result.added)}, modified {len(result.modified)}, "
                  f"removed {len(result.removed)}, unchanged {result.unchanged}")


# ---- log -------------------------------------------------------------------------------
@command("log")
@id_option()
@name_options(version=False)
@json_option
@pass_state
def log(state: State, dataset_id, project, name, as_json):
    """The version and its ancestors, newest first (the DAG as text)."""
    ds = select(state, dataset_id, project, name)
    versions = ops.log(ds)
    if state.want_json(as_json):
        output.as_json(versions)
        return
    rows = []
    for v in versions:
        parents = ", ".join(output.short_id(p) for p in v["parents"]) or "-"
        counts = f"+{v.get('added', 0)} ~{v.get('modified', 0)} -{v.get('removed', 0)}"
        rows.append((output.short_id(v["id"]), f"{v['project']}/{v['name']}", v["version"],
                     v["state"], counts, f"parents: {parents}"))
    output.results(output.table(("id", "dataset", "version", "state", "changes", "parents"),
                                rows)[1:])


# ---- verify ----------------------------------------------------------------------------
@command("verify")
@id_option()
@click.option("--folder", metavar="DIR", type=click.Path(file_okay=False),
              help="Verify this local copy instead of the stored bytes.")
@click.option("--filesize", is_flag=True, help="Check sizes only, not hashes (fast).")
@click.option("--verbose", is_flag=True, hidden=True)
@json_option
@pass_state
def verify(state: State, dataset_id, folder, filesize, verbose, as_json):
    """Check a version's bytes (or a local copy) against its manifest."""
    ds = select(state, dataset_id)
    problems = ds.verify_dataset_hash(local_copy_path=folder, skip_hash=filesize,
                                      progress=state.progress())
    count = len(ds.view().files)
    if state.want_json(as_json):
        output.as_json({"id": ds.id, "ok": not problems, "files": count,
                        "problems": problems})
    else:
        output.results(problems)
        if not problems:
            output.result(f"ok: {output.plural(count, 'file')} verified")
    if problems:
        raise CheckFailed(f"{output.plural(len(problems), 'problem')} in {describe(ds)}")


# ---- get -------------------------------------------------------------------------------
def _replace_with_link(link: str, target: str) -> None:
    """Point `link` at `target`; whatever is at `link` (checked by the caller) goes."""
    if os.path.islink(link) or os.path.isfile(link):
        os.unlink(link)
    elif os.path.isdir(link):
        shutil.rmtree(link)
    os.makedirs(os.path.dirname(os.path.abspath(link)), exist_ok=True)
    os.symlink(target, link, target_is_directory=True)


@command("get")
@id_option()
@name_options()
@click.option("--copy", "copy_to", metavar="DIR",
              help="Write a writable copy into DIR (must be empty, or --overwrite).")
@click.option("--link", "link_at", metavar="DIR",
              help="Make DIR a symlink to the read-only cached copy.")
@click.option("--overwrite", is_flag=True, help="Replace what is at DIR.")
@click.option("--part", type=int, metavar="K",
              help="Get only part K (0-based) of --num-parts N, for sharded jobs.")
@click.option("--num-parts", type=int, metavar="N", help="Number of parts.")
@pass_state
def get(state: State, dataset_id, project, name, version, copy_to, link_at, overwrite, part,
        num_parts):
    """Get a version as plain files; prints the folder.

    Without --copy or --link, the read-only cached copy is made (or reused) and its path
    printed.
    """
    if copy_to and link_at:
        raise click.UsageError("--copy and --link exclude each other")
    if link_at and os.path.lexists(link_at) and not overwrite:
        raise TargetNotEmpty(f"{link_at} exists; use --overwrite to replace it")
    ds = select(state, dataset_id, project, name, version)
    if link_at:
        check_destination(ds.repo, link_at, link=True)
    if copy_to:
        where = ds.get_mutable_local_copy(copy_to, overwrite=overwrite, part=part,
                                          num_parts=num_parts, progress=state.progress())
    else:
        where = ds.get_local_copy(part=part, num_parts=num_parts, progress=state.progress())
        if link_at:
            _replace_with_link(link_at, where)
            where = link_at
    output.info(state.quiet, f"got {describe(ds)}")
    output.result(os.path.abspath(where))


COMMANDS = [list_, search, compare, log, verify, get]
