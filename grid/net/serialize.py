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

import io
import pickle
import traceback
import types

from ..errors import GridError, RemoteError, RemoteTraceback

PROTOCOL = 5
OUT_OF_BAND_MIN = 64 * 1024  # smaller buffers are cheaper in-band
_MAIN = b"__main__"

try:  # optional: lambdas, closures and __main__ functions by value
    import cloudpickle as _cloudpickle
except ImportError:  # pragma: no cover - exercised by the stdlib-only test in a subprocess
    _cloudpickle = None


class SerializationError(GridError, TypeError):
    """An object cannot be sent to another process (the message says what to do)."""


class _Pickler(pickle.Pickler):
    """The C pickler, noting whether anything must travel by value (it is in ``__main__``).

    ``reducer_override`` is not called for plain data (ints, strings, bytes, lists, ...);
    ``dumps`` uses this pickler only for a pickle that names ``__main__``.
    """

    def __init__(self, file, buffer_callback=None):
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.needs_value = False

    def reducer_override(self, obj):
        if not self.needs_value and isinstance(obj, (types.FunctionType, type)) \
                and getattr(obj, "__module__", None) == "__main__":
            self.needs_value = True
        return NotImplemented


def dumps(obj, buffers: list | None = None) -> bytes:
    """Pickle ``obj``; with ``buffers``, out-of-band buffers are appended to it.

    Raises:
        SerializationError: it cannot travel (the message says why and what to do).
    """
    # The common case in one C call. A reference to anything defined in __main__ writes that
    # module's name into the pickle, so a pickle without it needs nothing by value; one with
    # it (or a string that happens to say it) is made again by the pickler that looks at
    # each function and class, to decide.
    try:
        data = pickle.dumps(obj, PROTOCOL, buffer_callback=None if buffers is None else buffers.append)
    except Exception as exc:
        if buffers is not None:
            buffers.clear()
        return _by_value(obj, exc, buffers)
    if _MAIN not in data:
        return data
    if buffers is not None:
        buffers.clear()
    file = io.BytesIO()
    pickler = _Pickler(file, None if buffers is None else buffers.append)
    try:
        pickler.dump(obj)
    except Exception as exc:  # it just pickled; a reducer_override that trips on an odd object
        if buffers is not None:
            buffers.clear()
        return _by_value(obj, exc, buffers)
    if pickler.needs_value and _cloudpickle is not None:
        if buffers is not None:
            buffers.clear()
        return _by_value(obj, None, buffers)
    return file.getvalue()


def loads(data, buffers=None):
    """Unpickle a payload received on an authenticated connection."""
    return pickle.loads(data, buffers=buffers)


def dumps_parts(obj) -> list:
    """Pickle ``obj`` into ``[pickle, buffer, ...]`` for a multipart frame.

    Buffers wrapped with ``out_of_band`` (see ``wrap_buffers``) travel out-of-band:
    written to the socket from the caller's object, never copied into the pickle.
    """
    buffers: list = []
    data = dumps(obj, buffers)
    if not buffers:
        return [data]
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
    file = io.BytesIO()
    pickler = _Pickler(file)
    try:
        pickler.dump(fn)
    except Exception as exc:
        raise SerializationError(_install_hint(fn, exc)) from exc
    if pickler.needs_value:
        raise SerializationError(_install_hint(fn, None))
    return file.getvalue()


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


def _wrap(value):
    if _is_large(value):
        return _OutOfBand(value)
    kind = type(value)
    if (kind is tuple or kind is list) and value and any(_is_large(item) for item in value):
        wrapped = [_OutOfBand(item) if _is_large(item) else item for item in value]
        return tuple(wrapped) if kind is tuple else wrapped
    return value


def wrap_buffers(values):
    """Mark the large buffers among ``values`` (and one level inside them) to travel out-of-band.

    Looks at the first value only to decide whether to look at all: a sequence of
    small items (the common case) costs one check, not one per item.
    """
    if not values:
        return values
    first = values[0]
    if not (_is_large(first) or (type(first) in (tuple, list) and any(_is_large(item) for item in first))):
        return values
    wrapped = [_wrap(value) for value in values]
    return tuple(wrapped) if type(values) is tuple else wrapped


# -- exceptions that travel -----------------------------------------------------------------------

def pack_error(exc: BaseException) -> tuple:
    """``(pickled exception, traceback text)``: pickled apart, so an exception the receiver
    cannot unpickle fails only what raised it (see ``unpack_error``)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = dumps(exc)
    except Exception as error:
        pickled = dumps(RemoteError(f"{type(exc).__name__}: {exc} (the exception itself cannot be "
                                    f"pickled: {error})"))
    return (pickled, text)


def unpack_error(packed) -> BaseException:
    """The exception another process raised, from ``pack_error``'s pair, with the remote
    traceback as its ``__cause__`` (a ``RemoteTraceback``)."""
    pickled, text = packed
    try:
        exc = loads(pickled)
    except Exception as error:  # say, a class whose __init__ does not take its own args
        raised = text.rstrip().splitlines()[-1] if text.strip() else "an exception"
        exc = RemoteError(f"the task raised {raised}, but that exception cannot be unpickled here "
                          f"({type(error).__name__}: {error}); make it picklable (its __reduce__ must "
                          "rebuild it) and its class importable where the executor runs")
    if not isinstance(exc, BaseException):
        exc = RemoteError(str(exc))
    exc.__cause__ = RemoteTraceback(text)
    return exc
