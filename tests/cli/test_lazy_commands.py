"""The CLI imports a command's module only when it runs: the table in strata.cli.main
must name every module's commands, and the short commands on a live mount must not pull
in the filesystem, the Dataset API, progress bars or http support."""

from __future__ import annotations

import importlib
import subprocess
import sys

from strata.cli import main as main_mod

HEAVY = ("strata.catalog.dataset", "strata.vfs.mount", "strata.vfs.core", "mfusepy",
         "tqdm", "http.client", "strata.storage.cache")

PROBE = """
import sys
from strata.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", *sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_the_table_names_each_modules_commands():
    for module, names in main_mod.COMMAND_MODULES.items():
        commands = importlib.import_module(module).COMMANDS
        assert sorted(c.name for c in commands) == sorted(names), module


def test_commands_on_a_live_mount_import_only_what_they_need(tmp_path):
    for args in (["status", str(tmp_path)], ["commit", str(tmp_path)],
                 ["discard", str(tmp_path)], ["unmount", str(tmp_path)], ["--version"]):
        run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=60)
        assert run.stdout.splitlines()[-1] == "imported:", (args, run.stdout, run.stderr)
