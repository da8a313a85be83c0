"""Managing versions and the repository: delete, squash, publish, set-description, tag,
metadata, rename, move, gc, repo init, repo info."""

from __future__ import annotations

import json

import click
from strata.catalog import config, ops, repostats
from strata.catalog.dataset import Dataset
from strata.cli import output
from strata.cli.errors import CliError
from strata.cli.options import StrataCommand, command, id_option, json_option, many, name_options
from strata.cli.state import State, describe, pass_state, remembered_id, select


@command("delete")
@id_option()
@name_options()
@click.option("--entire-dataset", is_flag=True,
              help="With --project/--name: every version of the dataset.")
@click.option("--force", is_flag=True, help="Also delete versions that have children.")
@pass_state
def delete(state: State, dataset_id, project, name, version, entire_dataset, force):
    """Delete a version (or a whole dataset) and the blobs only it used."""
    if project or name:
        if dataset_id:
            raise click.UsageError("give either --id or --project/--name, not both")
        if not (project and name):
            raise click.UsageError("--project and --name select a dataset together")
    elif version or entire_dataset:
        raise click.UsageError("--version and --entire-dataset need --project and --name")
    else:
        dataset_id = dataset_id or remembered_id(state)
    deleted = Dataset.delete(dataset_id, project, name, force=force, dataset_version=version,
                             entire_dataset=entire_dataset, repo=state.repo)
    for vid in deleted:
        output.result(f"deleted {vid}")


@command("squash")
@click.option("--name", required=True, help="Name of the new, flat version.")
@many("--ids", required=True, metavar="ID...", help="Versions to merge, in order.")
@click.option("--project", help="Project of the new version (default: the first one's).")
@click.option("--version", "version", metavar="X.Y.Z", help="Label of the new version.")
@pass_state
def squash(state: State, name, ids, project, version):
    """Merge versions into one with no parents (no bytes copied); prints its id."""
    ds = Dataset.squash(name, dataset_ids=list(ids), dataset_project=project,
                        dataset_version=version, repo=state.repo)
    output.info(state.quiet, f"squashed {len(ids)} versions into {describe(ds)}")
    output.result(ds.id)


@command("publish")
@id_option("The final version to publish.", required=True)
@pass_state
def publish(state: State, dataset_id):
    """Mark a final version as published."""
    ds = select(state, dataset_id)
    ds.publish()
    output.info(state.quiet, f"published {describe(ds)}")


@command("set-description")
@id_option()
@click.option("--description", required=True, help="The new description.")
@pass_state
def set_description(state: State, dataset_id, description):
    """Change the description of a version."""
    ds = select(state, dataset_id)
    ds.set_description(description)
    output.info(state.quiet, f"description of {describe(ds)} set")


@command("tag")
@id_option()
@many("--add", "add_tags", metavar="TAG...", help="Tags to add.")
@many("--remove", "remove_tags", metavar="TAG...", help="Tags to remove.")
@pass_state
def tag(state: State, dataset_id, add_tags, remove_tags):
    """Add or remove tags; prints the version's tags."""
    ds = select(state, dataset_id)
    if add_tags:
        ds.add_tags(list(add_tags))
    if remove_tags:
        ds.remove_tags(list(remove_tags))
    output.results(output.shown(t) for t in ds.tags)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CliError(f"--set is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CliError("--set needs a JSON object, like '{\"key\": 1}'")
    return value


@command("metadata")
@id_option()
@click.option("--set", "set_json", metavar="JSON",
              help="Replace the metadata with this JSON object.")
@click.option("--merge", is_flag=True, help="With --set: update the keys given, keep others.")
@click.option("--get", "show", is_flag=True, help="Print the metadata (the default).")
@pass_state
def metadata(state: State, dataset_id, set_json, merge, show):
    """Read or set a version's metadata (a JSON object)."""
    new = _json_object(set_json) if set_json is not None else None
    ds = select(state, dataset_id)
    if new is not None:
        ds.set_metadata(new, replace=not merge)
    if new is None or show:
        output.as_json(ds.get_metadata())


@command("rename")
@click.option("--project", required=True, help="Project of the dataset.")
@click.option("--name", required=True, help="Current name.")
@click.option("--new-name", required=True, help="New name.")
@pass_state
def rename(state: State, project, name, new_name):
    """Rename a dataset (every version)."""
    moved = ops.rename(project, name, new_name=new_name, repo=state.repo)
    output.info(state.quiet, f"renamed {project}/{name} to {project}/{new_name} "
                             f"({output.plural(moved, 'version')})")


@command("move")
@click.option("--project", required=True, help="Current project.")
@click.option("--name", required=True, help="Name of the dataset.")
@click.option("--new-project", required=True, help="New project.")
@pass_state
def move(state: State, project, name, new_project):
    """Move a dataset (every version) to another project."""
    moved = ops.rename(project, name, new_project=new_project, repo=state.repo)
    output.info(state.quiet, f"moved {project}/{name} to {new_project}/{name} "
                             f"({output.plural(moved, 'version')})")


@command("gc")
@click.option("--grace", type=click.IntRange(min=0), default=ops.GC_GRACE_SECONDS,
              show_default=True, metavar="SECONDS",
              help="Keep unreferenced objects younger than this (uploads in flight).")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@json_option
@pass_state
def gc(state: State, grace, dry_run, as_json):
    """Remove blobs and manifests no version references."""
    found = ops.gc(state.repo, grace_seconds=grace, dry_run=dry_run)
    if state.want_json(as_json):
        output.as_json({"dry_run": dry_run, **found})
        return
    verb = "would remove" if dry_run else "removed"
    output.result(f"{verb} {output.plural(found['blobs'], 'blob')} "
                  f"({output.format_size(found['bytes'])}) and "
                  f"{output.plural(found['manifests'], 'manifest')}")


@click.group("repo")
def repo_group():
    """The repository itself."""


@repo_group.command("init", cls=StrataCommand)
@click.argument("url", required=False)
@click.option("--chunk-size", metavar="SIZE", help="Chunk size of large files (e.g. 8M).")
@click.option("--pack-size", metavar="SIZE", help="Target size of packs of small files "
                                                  "(e.g. 64M).")
@pass_state
def repo_init(state: State, url, chunk_size, pack_size):
    """Create an empty repository at URL (default: --repo or the configured one); prints
    its URL. An existing repository is left as it is."""
    repo, created = repostats.init_repository(
        url or state.repo, chunk_size=config.parse_size(chunk_size) if chunk_size else None,
        pack_size=config.parse_size(pack_size) if pack_size else None)
    if created:
        output.info(state.quiet, f"initialised an empty strata repository at {repo.url} "
                                 f"(chunk size {output.format_size(repo.chunk_size)})")
    else:
        output.info(state.quiet, f"{repo.url} is already a strata repository; left as it is")
    output.result(repo.url)


@repo_group.command("info", cls=StrataCommand)
@click.argument("url", required=False)
@json_option
@pass_state
def repo_info(state: State, url, as_json):
    """Format, chunk size and what the repository at URL holds (default: --repo or the
    configured one)."""
    stats = repostats.repository_stats(url or state.repo)
    if state.want_json(as_json):
        output.as_json(stats.to_dict())
        return
    size = output.format_size
    output.results([
        f"repository:  {stats.url}",
        f"format:      {stats.format} ({stats.hash})",
        f"chunk size:  {size(stats.chunk_size)}",
        f"pack size:   {size(stats.pack_size)}",
        f"datasets:    {stats.datasets}",
        f"versions:    {stats.versions}",
        f"blobs:       {stats.blobs} ({size(stats.blob_bytes)})",
        f"manifests:   {stats.manifests} ({size(stats.manifest_bytes)})",
    ])


COMMANDS = [delete, squash, publish, set_description, tag, metadata, rename, move, gc,
            repo_group]
