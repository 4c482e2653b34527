"""Connecting to a cluster: ``connect()`` and the process-wide default ``cluster()``.

A ``Cluster`` is either a client (it talks to the members over one
authenticated link and follows the member list they push) or, with
``member=True``, a full member running in this process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuid_module

from .code import livecode, patches
from .net import messaging
from .cluster.config import Config, load_config
from .cluster.discovery import MulticastDiscovery, make_discovery
from .errors import GridError, NotConnected, TransportError
from .cluster.membership import Listeners, Member
from .peer import Peer
from .net.transport import Transport

log = logging.getLogger("grid.client")


class Cluster:
    """A handle on a cluster; use ``grid.connect()`` to make one.

    It is a context manager; ``close()`` leaves nothing running.
    """

    def __init__(self, config: Config, *, member: bool = False, timeout: float | None = None):
        self.config = config
        self.is_member = member
        self._closed = False
        self._executor = None
        self._executor_lock = threading.Lock()
        if member:
            self._peer = Peer(config)
            self._peer.start(timeout)
            self._link = None
        else:
            self._peer = None
            self._link = _ClientLink(config, timeout=timeout)
        close_at_exit(self, self.close)

    def members(self) -> list[Member]:
        """The current members, oldest (the master) first."""
        self._check_open()
        return list(self._peer.members() if self._peer else self._link.members)

    def master(self) -> Member | None:
        members = self.members()
        return members[0] if members else None

    def add_membership_listener(self, listener) -> None:
        """Call ``listener(event)`` for each member that joins or leaves, in order.

        ``event.kind`` is "joined" or "left", ``event.member`` the member and
        ``event.members`` the list after the change.
        """
        self._check_open()
        if self._peer:
            self._peer.membership.add_listener(listener)
        else:
            self._link.listeners.add(listener)

    def remove_membership_listener(self, listener) -> None:
        if self._peer:
            self._peer.membership.remove_listener(listener)
        else:
            self._link.listeners.remove(listener)

    # -- cluster-wide code (see livecode.py) ------------------------------------------------------

    def run_all(self, fn, /, *args, **kwargs) -> dict:
        """Call ``fn(*args, **kwargs)`` on every member; returns ``{member: result}``.

        Raises:
            SomeMembersFailed: it raised on some members (``.errors``; ``.results`` holds the rest).
            CodeNotAllowed: (in ``.errors``) for a member running with ``allow_code = false``.
        """
        return self._run_everywhere(livecode.call_body(fn, args, kwargs), "run_all")

    def eval_all(self, expression: str, module: str = "user") -> dict:
        """Evaluate ``expression`` in module ``module`` on every member; ``{member: value}``.

        Raises:
            SyntaxError: at once, before anything is sent.
            SomeMembersFailed: it raised on some members.
        """
        return self._run_everywhere(livecode.eval_body(expression, module), "eval_all")

    def exec_all(self, source: str, module: str = "user", *, filename: str | None = None,
                 local: bool = True) -> dict:
        """Execute ``source`` in module ``module`` on every member, and log it for later joiners.

        The module is created if absent and registered in ``sys.modules``, so what the
        code defines pickles by reference afterwards: ``exec_all("def worker(x): ...")``
        then ``fmap(user.worker, ...)`` needs no cloudpickle. With ``local`` (the default)
        it runs in this process first, so ``import user`` works here too, and an error
        raises here before anything is sent.

        Returns:
            ``{member: None}`` for every member.

        Raises:
            SyntaxError: at once, before anything is sent.
            SomeMembersFailed: it raised on some members; the patch stays in the log.
        """
        patch = patches.exec_patch(source, module, filename)
        return self._apply_everywhere(patch, local, "exec_all")

    def load_all(self, path, module: str | None = None, *, local: bool = True) -> dict:
        """Ship a ``.py`` file (or a package folder) and run it on every member as ``module``.

        ``module`` defaults to the file's (or folder's) name. It is logged for later joiners
        and, with ``local``, imported in this process too. Loading it again re-runs it in place.
        """
        patch = patches.load_patch(path, module)
        return self._apply_everywhere(patch, local, "load_all")

    def deploy(self, module) -> dict:
        """Ship an importable module (a module object or its name) to every member.

        The source of its whole top-level package travels (modules with compiled extensions
        cannot); members import it by name afterwards, so its functions pickle by reference.
        It is logged for later joiners.
        """
        patch = patches.deploy_patch(module)
        return self._apply_everywhere(patch, False, "deploy")

    def patches(self) -> list:
        """The patch log, oldest first: what a member that joins now replays before taking work."""
        epoch, entries = self._code_request("code.patches", None, retry=True)
        return patches.patches_from(entries)

    def reset_patches(self) -> int:
        """Clear the patch log for members that join from now on; returns how many were cleared.

        It does not undo code that already ran: members keep what it defined. It is not
        retried after a lost master (a second reset could clear a patch sent in between):
        if it raises, look at ``patches()`` and reset again if needed.
        """
        return self._code_request("code.reset", None, retry=False)

    def _run_everywhere(self, body, what: str) -> dict:
        outcomes = self._code_request("code.run_all", body, retry=False)
        return livecode.results_by_member(outcomes, self.members(), what)

    def _apply_everywhere(self, patch: dict, local: bool, what: str) -> dict:
        if local and not self.is_member:
            patches.apply_patch(patch)  # raises here, with nothing sent, if it fails
        outcomes = self._code_request("code.submit", patch, retry=True)
        return livecode.results_by_member(outcomes, self.members(), what)

    def _code_request(self, message_type: str, body, *, retry: bool):
        """Ask the cluster; with ``retry``, again (same patch id: logged once) while no master answers."""
        self._check_open()
        deadline = time.monotonic() + 2 * self.config.failure_timeout + self.config.handshake_timeout
        while True:
            try:
                if self._peer:
                    return self._peer.code.local_request(message_type, body).result()
                return self._link.request(message_type, body).result()
            except (livecode.MasterUnavailable, TransportError, NotConnected) as exc:
                if not retry or time.monotonic() >= deadline:
                    raise
                log.info("%s: %s; trying again", message_type, exc)
                # The master may be changing: wait a little (not a busy loop), then ask again.
                threading.Event().wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def executor(self):
        """This handle's own ``GridExecutor`` (made on first use, shut down by ``close()``)."""
        self._check_open()
        with self._executor_lock:
            if self._executor is None or self._executor._shutdown:
                from .compute.executor import GridExecutor

                self._executor = GridExecutor(cluster=self)
            return self._executor

    def service(self, name: str):
        """A callable that runs the service ``name`` on a member that offers it.

        ``cluster.service("resize")(image)`` returns the result; ``.submit(...)`` returns a
        Future. Tasks fail over to another member offering it, like any task.

        Raises:
            ServiceNotFound: (when called) no member offers ``name``; the error lists those that exist.
        """
        from .compute.services import ServiceProxy

        return ServiceProxy(self.executor(), name)

    def close(self) -> None:
        """Disconnect (or, as a member, leave the cluster cleanly). Idempotent."""
        if self._closed:
            return
        self._closed = True
        forget_at_exit(self)
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._peer:
            self._peer.close()
        else:
            self._link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise NotConnected("this Cluster handle is closed; call grid.connect() for a new one")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "member" if self.is_member else "client"
        state = "closed" if self._closed else f"{len(self.members())} members"
        return f"<Cluster {self.config.id!r} {role}, {state}>"


class _ClientLink:
    """A client's link to the cluster: one connection to some member, re-made when it drops."""

    def __init__(self, config: Config, *, timeout: float | None):
        self.config = config
        self.members: tuple[Member, ...] = ()
        self.version = 0
        self.listeners = Listeners()
        self._secret = config.resolved_secret()
        self._router = messaging.Router()
        self._router.register("members", self._on_members)
        self._closed = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._conn = None
        self._last_answer = time.monotonic()
        self._transport = Transport(
            cluster_id=config.id, secret=self._secret,
            info={"uuid": uuid_module.uuid4().hex, "role": "client"},
            on_frame=self._router.on_frame, on_close=self._on_close,
            handshake_timeout=config.handshake_timeout, tls=config.tls)
        try:
            self._discovery = make_discovery(config.replace(register_on_join=False), secret=self._secret)
            if isinstance(self._discovery, MulticastDiscovery):
                # Listen for members' announcements; a client asks but is never a candidate.
                self._discovery.set_state("client")
                self._discovery.start((config.bind_host(), 0))
            wait = timeout if timeout is not None else config.join_timeout + config.handshake_timeout
            self._connect(deadline=time.monotonic() + wait)
        except BaseException:
            self._transport.close()
            if hasattr(self, "_discovery"):
                self._discovery.stop(clean=False)
            self.listeners.close()
            raise
        self._thread = threading.Thread(target=self._keep_connected, name="grid-client")
        self._thread.start()

    def _candidates(self) -> list:
        known = [m.address for m in self.members]
        return known + [address for address in self._discovery.candidates() if address not in known]

    def _connect(self, deadline: float) -> None:
        reasons = {}
        while not self._closed.is_set():
            for address in self._candidates():
                try:
                    conn = self._transport.connect(address).result(self.config.handshake_timeout)
                    reply = messaging.request(conn, "client_hello", None).result(self.config.handshake_timeout)
                except Exception as exc:
                    reasons[address] = str(exc) or type(exc).__name__
                    continue
                with self._lock:
                    self._conn = conn
                    self._last_answer = time.monotonic()
                    self._lost.clear()
                self._update(reply["version"], reply["members"])
                return
            if time.monotonic() >= deadline:
                tried = "; ".join(f"{h}:{p}: {why}" for (h, p), why in reasons.items()) or "no candidates found"
                raise NotConnected(f"cannot reach any member of cluster {self.config.id!r} ({tried}); "
                                   "start a member (`python -m grid peer`) or check `members` and the secret")
            self._closed.wait(0.1)

    def _on_members(self, conn, body) -> None:
        self._update(body["version"], body["members"])

    def _update(self, version: int, members) -> None:
        members = tuple(Member.from_wire(m) for m in members)
        with self._lock:
            same_master = bool(members) and bool(self.members) and members[0].uuid == self.members[0].uuid
            if same_master and version <= self.version:
                return  # older news from the same master (a push can overtake the hello reply)
            old, self.members = self.members, members
            self.version = version
            self.listeners.emit_changes(old, self.members, version)

    def _on_close(self, conn) -> None:
        if conn is self._conn:
            self._lost.set()

    def _check_alive(self) -> None:
        """Ask the member for the member list each heartbeat; drop the link if it stops answering.

        A frozen or hung member keeps its socket open, and it is the one that would tell us
        it was removed: without this a client (and its pending requests) would wait forever.
        """
        with self._lock:
            conn, last_answer = self._conn, self._last_answer
        if conn is None or not conn.is_open:
            return
        silent = time.monotonic() - last_answer
        if silent > self.config.failure_timeout:
            log.warning("member at %s has not answered for %.1f s; linking to another member", conn.remote, silent)
            conn.close(f"the member did not answer for {silent:.1f} s (failure_timeout)")
            return
        try:
            messaging.request(conn, "client_hello", None).add_done_callback(self._answered)
        except GridError:
            pass  # closing: _on_close reconnects

    def _answered(self, done) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        reply = done.result()
        with self._lock:
            self._last_answer = time.monotonic()
        self._update(reply["version"], reply["members"])

    def _keep_connected(self) -> None:
        while not self._closed.is_set():
            if not self._lost.wait(self.config.heartbeat_interval):
                self._check_alive()
                continue
            if self._closed.is_set():
                return
            log.info("lost the link to the cluster; reconnecting")
            try:
                self._connect(deadline=time.monotonic() + self.config.failure_timeout)
            except NotConnected as exc:
                log.warning("%s", exc)
                self._closed.wait(1.0)

    def request(self, message_type: str, body):
        """A request to the member this link is on; the Future fails if the link is down."""
        with self._lock:
            conn = self._conn
        if conn is None or not conn.is_open:
            raise NotConnected("the link to the cluster is down; it is being re-made")
        return messaging.request(conn, message_type, body)

    def close(self) -> None:
        self._closed.set()
        self._lost.set()
        self._thread.join()
        self._transport.close()
        self._discovery.stop(clean=False)
        self.listeners.close()


def connect(config=None, *, member: bool = False, timeout: float | None = None) -> Cluster:
    """Connect to a cluster and return a ``Cluster`` handle.

    Args:
        config: a Config, a dict of config keys, a path to a config file, or None for
            the lookup (./grid.toml, ~/.grid/grid.toml, the GRID environment variable).
        member: make this process a full member (it holds data and runs work).
        timeout: seconds to wait for the cluster (default: join_timeout + handshake_timeout).

    Raises:
        NotConnected: no member could be reached.
        ConfigError: the config is invalid.
    """
    return Cluster(load_config(config), member=member, timeout=timeout)


_default: Cluster | None = None
_default_lock = threading.Lock()
_open: dict = {}  # handle -> its close function; strong: an unreferenced handle still has threads
_exit_hook_lock = threading.Lock()
_exit_hook_installed = False


def close_at_exit(handle, close) -> None:
    """Call ``close()`` at interpreter exit unless ``forget_at_exit(handle)`` came first.

    Python waits for non-daemon threads at exit; this hook runs before that (as
    concurrent.futures' does), so a handle its owner forgot to close cannot keep the
    process alive. Handles close newest first: an executor before the cluster it uses.
    """
    global _exit_hook_installed
    with _exit_hook_lock:
        _open[handle] = close
        if not _exit_hook_installed:
            threading._register_atexit(_close_all_at_exit)
            _exit_hook_installed = True


def forget_at_exit(handle) -> None:
    with _exit_hook_lock:
        _open.pop(handle, None)


def _close_all_at_exit() -> None:
    with _exit_hook_lock:
        closers = list(_open.items())
    for handle, close in reversed(closers):
        try:
            close()
        except Exception:  # exiting anyway: one broken handle must not keep the others open
            log.exception("closing %r at exit failed", handle)


def cluster() -> Cluster:
    """The process-wide default connection, made on first use from the config lookup."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = connect()
        return _default
