"""The one error hierarchy of esm2cli, with its exit codes and HTTP statuses.

Exit code 2 means the user must change the command or the input; 1 means a runtime failure.
"""

from __future__ import annotations


class Esm2Error(Exception):
    """Base of every error esm2cli raises on purpose."""


class InputError(Esm2Error):
    """The input (a FASTA file, a request body) cannot be embedded as it is.

    Attributes:
        param: The request field at fault, when there is one (OpenAI-style errors name it).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TooLargeError(InputError):
    """A request that can never be served as it is, whatever the load (more work than the server's queue holds)."""


class NotFoundError(InputError):
    """The request names something the server does not have (a model, a route)."""


class AuthenticationError(Esm2Error):
    """The request carries no API key, or one the server does not accept."""


class ClientDisconnectedError(Esm2Error):
    """The client closed its connection before the answer was ready; its work was dropped."""


class FastaError(InputError):
    """A FASTA file is unreadable or holds records that cannot be embedded."""


class MutantError(InputError):
    """A mutant list is unreadable or holds mutants that cannot be scored."""


class ConfigError(Esm2Error):
    """An option value or a combination of options is not usable."""


class DeviceError(ConfigError):
    """The devices asked for do not exist on this machine."""


class ModelLoadError(Esm2Error):
    """The model cannot be found, downloaded, or is not an ESM model."""


class OutputError(Esm2Error):
    """The output cannot be written."""


class StorageError(Esm2Error):
    """A file or object cannot be read or written (missing, denied, no credentials)."""


class EngineError(Esm2Error):
    """A replica failed or the engine is not running."""


class BatchError(EngineError):
    """A batch raised on a replica; the original exception is the cause."""

    def __init__(self, device: str, cause: BaseException):
        super().__init__(f"a batch failed on {device}: {type(cause).__name__}: {cause}")
        self.device = device
        self.__cause__ = cause


class DamagedFileError(OutputError):
    """A file esm2cli wrote earlier fails its checks (a Parquet page's checksum): its rows are not used."""

    def __init__(self, path: str):
        super().__init__(f"{path} is damaged (a Parquet page fails its checksum)")
        self.path = path


class OutputExistsError(ConfigError):
    """The output is already there and the user did not ask to replace it."""


class PartsError(InputError):
    """The parts of a sharded run cannot be merged: missing, of other shard counts, or of other runs."""


class OutputLockedError(ConfigError):
    """Another live run is writing the same output."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the run
    """SIGINT or SIGTERM arrived: unwind, keep the finished chunks, exit 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class OverloadedError(Esm2Error):
    """The engine's queue is full; the caller should retry later."""


class NotReadyError(Esm2Error):
    """The engine is still loading."""


class RequestTimeoutError(Esm2Error):
    """A request was not answered in time."""


_EXIT_CODES: dict[type[Esm2Error], int] = {
    InputError: 2,
    ConfigError: 2,
}

_HTTP_STATUSES: dict[type[Esm2Error], int] = {
    InputError: 422,
    NotFoundError: 404,
    TooLargeError: 413,
    AuthenticationError: 401,
    ClientDisconnectedError: 499,  # nginx's "client closed request": counted, never seen by the client
    OverloadedError: 429,
    NotReadyError: 503,
    RequestTimeoutError: 503,
}


def _lookup(exc: Esm2Error, table: dict[type[Esm2Error], int], default: int) -> int:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return default


def exit_code(exc: Esm2Error) -> int:
    """Returns the process exit code for an error: 2 for bad input or options, else 1."""
    return _lookup(exc, _EXIT_CODES, 1)


def http_status(exc: Esm2Error) -> int:
    """Returns the HTTP status for an error (401, 404, 413, 422, 429, 499, 503, else 500)."""
    return _lookup(exc, _HTTP_STATUSES, 500)
