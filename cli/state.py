"""The global options every command sees (`State`, the click context object) and the one
rule for choosing a dataset: --project/--name when given, else --id, else the last dataset
this user touched in the repository.

The Dataset API and the progress bars are imported when a command first needs them:
every command imports this module, and `strata status` needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import click
from strata.catalog import config
from strata.catalog.errors import UnknownVersion
from strata.cli.errors import CliError

if TYPE_CHECKING:
    from strata.catalog.dataset import Dataset
    from strata.catalog.progress import Progress


@dataclass
class State:
    repo: str | None = None      # as given by --repo; None lets the library resolve it
    json: bool = False
    debug: bool = False
    quiet: bool = False
    touched: tuple[str, str] | None = None  # (repo url, id) the command selected

    def repo_url(self) -> str:
        """The effective repository URL (after STRATA_REPO, config file, embedded default)."""
        from strata.catalog.repo import open_repo
        return open_repo(self.repo).url

    def want_json(self, per_command: bool) -> bool:
        return self.json or per_command

    def progress(self) -> Progress:
        return make_progress(self.quiet)

    def remember_touched(self) -> None:
        """Make the dataset this command selected the default --id of the next one. Called
        only after the command succeeded, so a failed command changes nothing."""
        if self.touched is not None:
            config.remember_last(*self.touched)


pass_state = click.make_pass_decorator(State, ensure=True)


def make_progress(quiet: bool) -> Progress:
    """A command's progress callback: tqdm bars, imported only by commands that report."""
    from strata.cli import progress
    return progress.make_progress(quiet)


def remembered_id(state: State) -> str:
    url = state.repo_url()
    last = config.last_touched(url)
    if not last:
        raise CliError(f"no dataset given and none used yet in {url}; "
                       "pass --id ID (or --project and --name)")
    return last


def select(state: State, dataset_id: str | None = None, project: str | None = None,
           name: str | None = None, version: str | None = None) -> Dataset:
    """The dataset a command acts on. A name selector never falls back to the remembered
    id (clearml-data does, and then acts on the wrong dataset)."""
    from strata.catalog.dataset import Dataset
    if project or name:
        if dataset_id:
            raise click.UsageError("give either --id or --project/--name, not both")
        if not (project and name):
            raise click.UsageError("--project and --name select a dataset together")
        ds = Dataset.get(dataset_project=project, dataset_name=name, dataset_version=version,
                         repo=state.repo)
    elif version:
        raise click.UsageError("--version needs --project and --name")
    elif dataset_id:
        ds = Dataset.get(dataset_id, repo=state.repo)
    else:
        last = remembered_id(state)
        try:
            ds = Dataset.get(last, repo=state.repo)
        except UnknownVersion:
            raise CliError(f"the last dataset you used ({last}) no longer exists in "
                           f"{state.repo_url()}; pass --id ID") from None
    state.touched = (ds.repo.url, ds.id)
    return ds


def describe(ds: Dataset) -> str:
    """'project/name 1.0.2 (id)' for messages."""
    return f"{ds.project}/{ds.name} {ds.version} ({ds.id})"
