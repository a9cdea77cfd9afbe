"""The one error tree: every error class has its exit code and HTTP status, and subclasses inherit them."""

from __future__ import annotations

import inspect

import pytest

from esm2cli import errors
from esm2cli.errors import (
    BatchError,
    ConfigError,
    DeviceError,
    Esm2Error,
    FastaError,
    InputError,
    Interrupted,
    OutputLockedError,
    TooLargeError,
    exit_code,
    http_status,
)

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, Esm2Error) and cls.__module__ == errors.__name__
]


def _instance(cls: type[Esm2Error]) -> Esm2Error:
    if cls is BatchError:
        return BatchError("cuda:1", RuntimeError("boom"))
    return cls("message")


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_maps_to_a_known_exit_code_and_status(cls):
    exc = _instance(cls)
    assert exit_code(exc) in (1, 2)
    assert http_status(exc) in (401, 404, 413, 422, 429, 499, 500, 503)
    # Input and option mistakes are the user's to fix (exit 2); nothing else is.
    assert (exit_code(exc) == 2) == isinstance(exc, InputError | ConfigError)


def test_subclasses_inherit_their_parents_mapping():
    assert exit_code(FastaError("bad record")) == 2 and http_status(FastaError("bad record")) == 422
    assert exit_code(DeviceError("no cuda:3")) == 2 and exit_code(OutputLockedError("held")) == 2
    assert http_status(TooLargeError("too big")) == 413  # the nearer class wins over InputError's 422
    assert exit_code(BatchError("cpu", ValueError("x"))) == 1 and http_status(BatchError("cpu", ValueError())) == 500


def test_batch_error_names_the_device_and_keeps_the_cause():
    cause = MemoryError("out of memory")
    exc = BatchError("cuda:1", cause)
    assert "cuda:1" in str(exc) and "MemoryError: out of memory" in str(exc)
    assert exc.__cause__ is cause and exc.device == "cuda:1"


def test_input_error_carries_the_field_at_fault():
    assert InputError("bad", param="input").param == "input"
    assert InputError("bad").param is None


def test_interrupted_is_not_an_error_of_the_run():
    # `except Exception` (a failed batch, a bad record) must never swallow a signal.
    assert not issubclass(Interrupted, Exception)
    assert Interrupted(15).signum == 15
