"""The errors a user can fix: one type per family of input, one line each, exit code 2.

A `UserError` names the input (a file, a config key, a row, a flag, an address), says what was
expected and what was found. The CLI prints it on one line as `unislim <command>: <message>` and
exits with `exit_code`; a traceback only with `--debug`. Anything else that escapes is a bug in
unislim, not in the input, and keeps its traceback.

    UserError
    ├── ConfigError      pipeline.yaml, overrides, CLI flags
    ├── DataError        calibration / evaluation rows
    ├── CheckpointError  a model folder (config.json, safetensors)
    ├── ClusterError     the Ray cluster, the job server
    └── StorageError     the runs dir, the out dir, the MLflow tracking store
"""

from __future__ import annotations

MAX_LINE = 500  # characters of one message line; an input's value can be huge (an alias bomb)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` with its whitespace runs folded into single spaces, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class UserError(Exception):
    """Bad input: `where` names it (file, key, row, flag), `problem` says expected vs found."""

    exit_code = 2

    def __init__(self, where: str, problem: str | None = None):
        if problem is None:  # one message "where: problem"
            where, _, problem = str(where).partition(": ")
        self.where = one_line(where, 200)
        self.problem = one_line(problem)
        super().__init__(f"{self.where}: {self.problem}")

    def __reduce__(self):  # pickled across Ray processes: rebuild from the parts, not the joined text
        return type(self), (self.where, self.problem)


class ConfigError(UserError, ValueError):
    """A pipeline file (or its overrides) is invalid; `errors` holds one line per problem.

    One problem prints as one line `<source>: <problem>`; several as a count, then one indented
    line each, so `unislim validate` lists every problem in one pass.
    """

    def __init__(self, source: str, errors: list[str]):
        self.source = one_line(source, 200)
        self.errors = [one_line(e) for e in errors] or ["invalid"]
        self.where, self.problem = self.source, "; ".join(self.errors)
        if len(self.errors) == 1:
            text = f"{self.source}: {self.errors[0]}"
        else:
            text = f"{self.source}: {len(self.errors)} errors\n" + "\n".join(f"  {e}" for e in self.errors)
        Exception.__init__(self, text)

    def __reduce__(self):
        return type(self), (self.source, self.errors)


class DataError(UserError, ValueError):
    """Calibration or evaluation data breaks a documented bound (row, column, value)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint folder cannot be loaded as it stands (its file, what is wrong)."""


class ClusterError(UserError, RuntimeError):
    """The Ray cluster or job server cannot be reached or used (its address, what happened)."""


class StorageError(UserError):
    """A place unislim writes to is unusable: the runs dir, the out dir, the MLflow store."""
