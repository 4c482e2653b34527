"""Turning Python objects into payloads and back (pickle protocol 5).

Only ever called on authenticated connections: nothing is unpickled before
the handshake has succeeded.

- Data goes through the C pickler (fast). What it cannot send correctly
  (lambdas, closures, classes and functions of ``__main__``) goes through
  cloudpickle, which sends them by value, when it is installed.
- Large ``bytes``, ``bytearray`` and ``memoryview`` objects (at the top level of
  a payload, or one level down in a tuple or list) travel as protocol-5
  out-of-band buffers: written to the socket straight from the caller's
  object, not copied into the pickle.
"""

from __future__ import annotations

import pickle

from .errors import GridError

PROTOCOL = 5
OUT_OF_BAND_MIN = 64 * 1024  # smaller buffers are cheaper in-band

try:  # optional: lambdas, closures and __main__ functions by value
    import cloudpickle as _cloudpickle
except ImportError:  # pragma: no cover - exercised by the stdlib-only test in a subprocess
    _cloudpickle = None

_MAIN_MARKER = b"__main__"


class SerializationError(GridError, TypeError):
    """An object cannot be sent to another process (the message says what to do)."""


def dumps(obj) -> bytes:
    """Pickle ``obj`` in-band (control messages and small payloads)."""
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        return _by_value(obj, exc)
    if _MAIN_MARKER in data and _cloudpickle is not None:
        return _by_value(obj, None)
    return data


def loads(data, buffers=None):
    """Unpickle a payload received on an authenticated connection."""
    return pickle.loads(data, buffers=buffers)


def dumps_parts(obj) -> list:
    """Pickle ``obj`` into ``[pickle, buffer, ...]``: large buffers travel out-of-band, uncopied.

    Small payloads (the common case) cost one C-pickler call; only a payload that
    came out large is scanned for buffers to send out-of-band.
    """
    data = dumps(obj)
    if len(data) < OUT_OF_BAND_MIN:
        return [data]
    wrapped = _wrap_large(obj)
    if wrapped is obj:
        return [data]
    buffers: list = []
    try:
        data = pickle.dumps(wrapped, protocol=PROTOCOL, buffer_callback=buffers.append)
    except Exception as exc:
        buffers.clear()
        data = _by_value(wrapped, exc, buffers)
    else:
        if _MAIN_MARKER in data and _cloudpickle is not None:
            buffers.clear()
            data = _by_value(wrapped, None, buffers)
    return [data, *(buffer.raw() for buffer in buffers)]


def loads_parts(parts):
    """The inverse of ``dumps_parts``: parts are the views of a multipart frame."""
    return pickle.loads(parts[0], buffers=parts[1:])


def dumps_function(fn) -> bytes:
    """Pickle a callable for remote execution: by reference if importable, else by value.

    Raises:
        SerializationError: it cannot travel (say, a lambda without cloudpickle installed).
    """
    if _cloudpickle is not None:
        try:
            return _cloudpickle.dumps(fn, protocol=PROTOCOL)
        except Exception as exc:
            raise SerializationError(f"cannot send {fn!r} to another process: {exc}") from exc
    try:
        data = pickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(_install_hint(fn, exc)) from exc
    if _MAIN_MARKER in data:
        raise SerializationError(_install_hint(fn, None))
    return data


def _by_value(obj, error, buffers=None) -> bytes:
    if _cloudpickle is None:
        raise SerializationError(_install_hint(obj, error)) from error
    try:
        if buffers is None:
            return _cloudpickle.dumps(obj, protocol=PROTOCOL)
        return _cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    except Exception as exc:
        raise SerializationError(f"cannot send {type(obj).__name__} object to another process: {exc}") from exc


def _install_hint(obj, error) -> str:
    what = getattr(obj, "__qualname__", None) or type(obj).__name__
    why = f" ({error})" if error is not None else ""
    return (f"cannot send {what!r} to another process{why}: without cloudpickle only importable "
            "functions and classes travel; lambdas, closures and what is defined in __main__ need "
            "`pip install cloudpickle` (a default dependency of hazelgrid)")


# -- out-of-band buffers ---------------------------------------------------------------------


class _OutOfBand:
    """Wraps a large buffer so the pickler hands it to ``buffer_callback`` instead of copying it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __reduce_ex__(self, protocol):
        value = self.value
        rebuild = {bytes: bytes, bytearray: bytearray}.get(type(value), _as_memoryview)
        return rebuild, (pickle.PickleBuffer(value),)


def _as_memoryview(buffer):
    return memoryview(buffer)


def _is_large(value) -> bool:
    kind = type(value)
    if kind is bytes or kind is bytearray:
        return len(value) >= OUT_OF_BAND_MIN
    if kind is memoryview:
        return value.nbytes >= OUT_OF_BAND_MIN and value.contiguous
    return False


def _wrap_large(obj):
    if _is_large(obj):
        return _OutOfBand(obj)
    kind = type(obj)
    if kind is tuple or kind is list:
        if any(_is_large(item) for item in obj):
            wrapped = [_OutOfBand(item) if _is_large(item) else _wrap_nested(item) for item in obj]
            return tuple(wrapped) if kind is tuple else wrapped
        if any(type(item) is tuple or type(item) is list for item in obj):
            wrapped = [_wrap_nested(item) for item in obj]
            return tuple(wrapped) if kind is tuple else wrapped
    return obj


def _wrap_nested(obj):
    kind = type(obj)
    if (kind is tuple or kind is list) and any(_is_large(item) for item in obj):
        wrapped = [_OutOfBand(item) if _is_large(item) else item for item in obj]
        return tuple(wrapped) if kind is tuple else wrapped
    return obj
