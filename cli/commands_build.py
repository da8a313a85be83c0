"""Building a version: create, add, remove, upload, close, sync (clearml-data's flags)."""

from __future__ import annotations

import os

import click
from strata.catalog.dataset import Dataset
from strata.catalog.errors import SourceMissing, UnknownVersion
from strata.cli import output
from strata.cli.options import command, id_option, many
from strata.cli.state import State, describe, pass_state, select


def _version_options(f):
    """The fields of a new version, shared by create and sync."""
    f = click.option("--description", help="Free-text description.")(f)
    f = many("--tags", metavar="TAG...", help="Tags of the new version.")(f)
    f = many("--parents", metavar="ID...",
             help="Parent version ids, merged in order (a later one overrides).")(f)
    f = click.option("--version", "version", metavar="X.Y.Z",
                     help="Version label (default: the next patch of the latest).")(f)
    return f


def _print_new_id(ds: Dataset) -> None:
    """The id alone on the last line of stdout, for `ID=$(strata create ...)`."""
    output.result(ds.id)


@command("create")
@click.option("--project", required=True, help="Project of the dataset.")
@click.option("--name", required=True, help="Name of the dataset.")
@_version_options
@pass_state
def create(state: State, project, name, version, parents, tags, description):
    """Create a draft version; prints its id."""
    ds = Dataset.create(name, project, parent_datasets=list(parents), dataset_version=version,
                        dataset_tags=list(tags), description=description, repo=state.repo)
    output.info(state.quiet, f"created draft {describe(ds)}")
    _print_new_id(ds)


@command("add")
@id_option("Draft version id (default: the last dataset you used).")
@many("--files", metavar="PATH...", help="Files or folders to add.")
@click.option("--dataset-folder", metavar="PATH",
              help="Folder inside the dataset to add them under (default: the root).")
@many("--wildcard", metavar="PATTERN...",
      help="Add only files matching these wildcards (e.g. '*.jpg').")
@click.option("--non-recursive", is_flag=True, help="Do not descend into sub-folders.")
@many("--links", metavar="URL...",
      help="External files or prefixes (s3://, gs://, azure://, https://, file://) to "
           "link without copying their bytes.")
@click.option("--verbose", is_flag=True, hidden=True)  # accepted for clearml-data scripts
@pass_state
def add(state: State, dataset_id, files, dataset_folder, wildcard, non_recursive, links,
        verbose):
    """Add files, folders or external links to a draft."""
    if not files and not links:
        raise click.UsageError("give --files PATH... and/or --links URL...")
    # all sources are checked first so that a typo in the last one changes nothing
    for path in files:
        if not os.path.lexists(path):
            raise SourceMissing(f"{path} does not exist")
    ds = select(state, dataset_id)
    recursive = not non_recursive
    patterns = list(wildcard) or None
    count = 0
    for path in files:
        count += ds.add_files(path, wildcard=patterns, dataset_path=dataset_folder,
                              recursive=recursive, progress=state.progress())
    if links:
        count += ds.add_external_files(list(links), wildcard=patterns,
                                       dataset_path=dataset_folder, recursive=recursive)
    output.info(state.quiet, f"{output.plural(count, 'file')} added or changed in "
                             f"{describe(ds)}")


@command("remove")
@id_option("Draft version id (default: the last dataset you used).")
@many("--files", required=True, metavar="PATH...",
      help="Dataset paths, folders, wildcards or link URLs to remove.")
@click.option("--non-recursive", is_flag=True,
              help="A wildcard matches whole paths only, not names in sub-folders.")
@click.option("--verbose", is_flag=True, hidden=True)
@pass_state
def remove(state: State, dataset_id, files, non_recursive, verbose):
    """Remove files from a draft."""
    ds = select(state, dataset_id)
    count = sum(ds.remove_files(path, recursive=not non_recursive) for path in files)
    output.info(state.quiet, f"{output.plural(count, 'file')} removed from {describe(ds)}")


@command("upload")
@id_option("Draft version id (default: the last dataset you used).")
@click.option("--verbose", is_flag=True, hidden=True)
@pass_state
def upload(state: State, dataset_id, verbose):
    """Upload a draft's new bytes (resumable; stored blobs are skipped)."""
    ds = select(state, dataset_id)
    written = ds.upload(progress=state.progress())
    output.info(state.quiet, f"uploaded {output.format_size(written)} for {describe(ds)}")


def _close(state: State, ds: Dataset, disable_upload: bool) -> None:
    if not disable_upload:
        ds.upload(progress=state.progress())
    ds.finalize(progress=state.progress())
    r = ds.record
    output.info(state.quiet, f"closed {describe(ds)}: {output.plural(r.files, 'file')}, "
                             f"{output.format_size(r.size)}")


@command("close")
@id_option("Draft version id (default: the last dataset you used).")
@click.option("--disable-upload", is_flag=True,
              help="Only finalize; fail if anything is not uploaded yet.")
@click.option("--verbose", is_flag=True, hidden=True)
@pass_state
def close(state: State, dataset_id, disable_upload, verbose):
    """Upload and finalize a draft: it becomes an immutable version."""
    ds = select(state, dataset_id)
    _close(state, ds, disable_upload)


@command("sync")
@id_option("Draft to sync into (default: create a new version of --project/--name).")
@click.option("--folder", required=True, metavar="DIR", help="Local folder to mirror.")
@click.option("--project", help="Project of the new version.")
@click.option("--name", help="Name of the new version.")
@_version_options
@click.option("--skip-close", is_flag=True, help="Leave the version a draft.")
@click.option("--dataset-folder", metavar="PATH",
              help="Folder inside the dataset that mirrors DIR (default: the root).")
@click.option("--verbose", is_flag=True, hidden=True)
@pass_state
def sync(state: State, dataset_id, folder, project, name, version, parents, tags,
         description, skip_close, dataset_folder, verbose):
    """Make a version mirror a local folder; prints the version id.

    Without --id, a new version of --project/--name is created whose parent is the
    latest final version of that dataset (or --parents), then closed unless --skip-close.
    """
    if not os.path.isdir(folder):  # checked before a draft is created
        raise SourceMissing(f"{folder} is not a folder" if os.path.exists(folder)
                            else f"{folder} does not exist")
    if dataset_id:
        if project or name or version or parents or tags or description:
            raise click.UsageError("--id syncs an existing draft; --project, --name, "
                                   "--version, --parents, --tags and --description only "
                                   "apply to a new version")
        ds = select(state, dataset_id)
    else:
        if not (project and name):
            raise click.UsageError("give --id of a draft, or --project and --name")
        if not parents:
            try:
                latest = Dataset.get(dataset_project=project, dataset_name=name,
                                     only_completed=True, repo=state.repo)
                parents = (latest.id,)
            except UnknownVersion:
                parents = ()  # the first version of this dataset
        from strata.catalog import config
        previous = config.last_touched(state.repo_url())
        ds = Dataset.create(name, project, parent_datasets=list(parents),
                            dataset_version=version, dataset_tags=list(tags),
                            description=description, repo=state.repo)
    try:
        removed, added, modified = ds.sync_folder(folder, dataset_path=dataset_folder,
                                                  progress=state.progress())
    except BaseException:
        if not dataset_id:   # the draft made for this sync holds nothing: it goes too,
            from strata.catalog.ops import delete   # and is not the last dataset touched
            delete(ds.id, repo=ds.repo)
            if previous:
                config.remember_last(ds.repo.url, previous)
        raise
    if not dataset_id:
        output.info(state.quiet, f"created draft {describe(ds)}")
    output.info(state.quiet, f"removed {removed}, added {added}, modified {modified}")
    if not skip_close:
        _close(state, ds, disable_upload=False)
    _print_new_id(ds)


COMMANDS = [create, add, remove, upload, close, sync]
