"""Named services: a member offers a function under a name; callers invoke it by that name.

::

    member process                                  caller
    --------------                                  ------
    @grid.service("resize")   (in a module the      cluster.service("resize")(image)
    def resize(image): ...     member imports:        = executor.submit_service("resize", image).result()
                               config `imports`)        routed only to members offering "resize"
    "services" request  <--------------------------   (asked once per link, again on a miss)
      -> offered()
    call_service("resize", image)  <---------------   an ordinary task, sent by reference
      -> the registered function

The registry is per process: what a member offers is what its own imports
registered. Re-running a module (``exec_all``, ``importlib.reload``) registers the
new function under the same name, replacing the old one.
"""

from __future__ import annotations

import logging
import threading

from ..errors import ServiceNotFound
from .worker import current_member

log = logging.getLogger("grid.services")

_registry: dict[str, object] = {}
_registry_lock = threading.Lock()

HOW_TO_OFFER = ('offer one with @grid.service("NAME") on a function in a module the members import: '
                "`python -m grid peer --import mymodule`, or `imports = [\"mymodule\"]` in the config")


def service(name=None):
    """Offer the decorated function as the service ``name`` from this process.

    Usable as ``@grid.service("resize")``, ``@grid.service()`` or bare ``@grid.service``
    (the name is then the function's ``__name__``). The function is returned unchanged,
    so it still works as a plain local call. Registering another function under a name
    already taken replaces it (re-running a module must work).

    Args:
        name: the service name, a non-empty string; None for the function's ``__name__``.

    Returns:
        The decorator (or, used bare, the function itself).

    Raises:
        TypeError: ``name`` is neither a string nor None, or the decorated object is not callable.
        ValueError: ``name`` is empty or only whitespace.
    """
    if callable(name) and not isinstance(name, str):  # bare @grid.service
        function = name
        _register(_checked_name(getattr(function, "__name__", None), function), function)
        return function
    if name is not None:
        _checked_name(name, None)

    def decorate(function):
        if not callable(function):
            raise TypeError(f"@grid.service decorates a function, not {type(function).__name__} {function!r}")
        _register(name if name is not None else _checked_name(getattr(function, "__name__", None), function),
                  function)
        return function

    return decorate


def _checked_name(name, function) -> str:
    if not isinstance(name, str):
        what = f" (the function {function!r} has no usable __name__)" if function is not None else ""
        raise TypeError(f"a service name must be a non-empty string, not {type(name).__name__} {name!r}{what}; "
                        'write @grid.service("name")')
    if not name.strip():
        raise ValueError(f"a service name must be a non-empty string, not {name!r}; write @grid.service(\"name\")")
    return name


def _register(name: str, function) -> None:
    with _registry_lock:
        previous = _registry.get(name)
        _registry[name] = function
    if previous is not None and previous is not function:
        log.info("service %r now runs %s (it replaces %s)", name, _describe(function), _describe(previous))
    else:
        log.debug("service %r offered by %s", name, _describe(function))


def _describe(function) -> str:
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None) or repr(function)
    return f"{module}.{qualname}" if module else qualname


def offered() -> list[str]:
    """The names of the services this process offers, sorted."""
    with _registry_lock:
        return sorted(_registry)


def call_service(name: str, /, *args, **kwargs):
    """Run the service ``name`` offered by this process: what a service task runs on a member.

    Raises:
        ServiceNotFound: this process offers no service ``name``; the error names the member
            and what it does offer.
        Whatever the service itself raises.
    """
    function = _registry.get(name)
    if function is None:
        names = offered()
        where = current_member()
        raise ServiceNotFound(f"member {where if where is not None else '(this process)'} offers no service "
                              f"{name!r}; it offers {names or 'none'}; {HOW_TO_OFFER}")
    return function(*args, **kwargs)


def register_handlers(router) -> None:
    """Answer "services" requests (an executor asks which services this member offers)."""
    router.register("services", lambda conn, body: offered())


class ServiceProxy:
    """Calls the service ``name`` through ``executor`` (see ``GridExecutor.submit_service``).

    ``proxy(*args, **kwargs)`` blocks for the result; ``proxy.submit(...)`` returns a Future;
    ``proxy.map(*iterables)`` works like ``Executor.map``.
    """

    def __init__(self, executor, name: str):
        self.executor = executor
        self.name = _checked_name(name, None)

    def __call__(self, *args, **kwargs):
        """Run the service on a member offering it and return its result.

        Raises:
            ServiceNotFound: no member offers the service (raised at once).
            WorkerCrashed: every member offering it that ran the call died.
            Whatever the service raised, with the remote traceback as ``__cause__``.
        """
        return self.submit(*args, **kwargs).result()

    def submit(self, *args, **kwargs):
        """Run the service on the least loaded member offering it; returns a Future.

        Raises:
            ServiceNotFound: no member offers the service (raised at once).
        """
        return self.executor.submit_service(self.name, *args, **kwargs)

    def map(self, *iterables, timeout=None, chunksize=None):
        """Like ``map(service, *iterables)`` on the members offering it: lazy, ordered.

        Args:
            timeout: seconds from this call until each next result must be ready.
            chunksize: items per task; None picks it from measured task times.

        Raises:
            ServiceNotFound: no member offers the service (raised at once).
        """
        return self.executor.map_service(self.name, *iterables, timeout=timeout, chunksize=chunksize)

    def __repr__(self) -> str:
        return f"<ServiceProxy {self.name!r} via {self.executor!r}>"
