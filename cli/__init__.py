"""The `strata` command line: a thin click shell over strata.catalog (and strata.vfs).

Parsing, output, progress bars and exit codes live here; everything a command does is a
call into the library. `strata.cli.main` holds the command group and the one place where
errors become exit codes; the commands live in `commands_*` modules grouped by theme.
"""
