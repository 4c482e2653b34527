"""Peer: the composition root of a member process.

It wires config -> transport -> router -> discovery -> membership, starts
them in that order and stops them in reverse.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import threading
import socket
import statistics
import time
import uuid as uuid_module

from .cluster.config import Config, load_config
from .cluster.discovery import make_discovery
from .cluster.members import advertised_address, local_member
from .cluster.membership import Membership
from .code import console
from .code.livecode import CodeService
from .compute import services, worker
from .compute.taskproc import TaskProcess
from .compute.worker import TaskRunner
from .logring import LogRing
from .metrics import Rates, percentiles
from .data.events import EventHub
from .data.service import DataService
from .errors import ConfigError, GridError, TransportError
from .net import messaging
from .net.address import format_address, is_loopback, parse_address
from .net.faults import SIM_FAULTS_ENV, Faults
from .net.folders import private_folder
from .net.transport import Transport

log = logging.getLogger("grid.peer")

_hub_lock = threading.Lock()
_running = None  # the Peer of this process once it is in a cluster (grid.cluster() in a task is its handle)


def running_peer():
    """The ``Peer`` this process runs as a member, once started; None in a client."""
    return _running


class Peer:
    """One member of a cluster, running in this process.

    Args:
        config: anything ``load_config`` takes (a Config, a dict, a path) or None for the lookup.
        clock: an object with ``monotonic()``.

    Raises:
        ConfigError, SecurityError: bad config, or a non-loopback bind without a secret.
    """

    def __init__(self, config=None, *, clock=time):
        self.config: Config = load_config(config)
        self.secret = self.config.resolved_secret()
        host = self.config.bind_host()
        if self.secret is None:
            log.warning("no secret configured: binding and discovering on loopback only (%s); "
                        "set `secret` or GRID_SECRET to reach other machines", host)
        elif not is_loopback(host) and self.config.tls is None:
            log.info("traffic is authenticated but not encrypted; add a [tls] section on untrusted networks")
        self.uuid = uuid_module.uuid4().hex
        self.log_ring = LogRing()  # its recent log lines, for `python -m grid logs`
        self.on_stop = None  # what a "stop" request does (python -m grid peer: leave and exit); else close()
        self.router = messaging.Router()
        self.transport = Transport(
            cluster_id=self.config.id, secret=self.secret, info={"uuid": self.uuid, "role": "member"},
            on_frame=self.router.on_frame, on_close=self._on_close,
            handshake_timeout=self.config.handshake_timeout, tls=self.config.tls, clock=clock,
            max_payload=self.config.max_frame_bytes)
        try:
            logging.getLogger("grid").addHandler(self.log_ring)
            bound = self.transport.listen(host, self.config.port)
            if self.transport.skipped_ports:
                wanted, why = self.transport.skipped_ports[0]
                log.warning("port %d is taken (%s); listening on %d instead: a member or client whose static "
                            "`members` list names port %d will not find this member", wanted, why, bound[1], wanted)
            self.address = advertised_address(*bound)
            self.transport.info["address"] = format_address(self.address)
            self._socket_dir = None
            unix = ""
            if hasattr(socket, "AF_UNIX"):  # a faster path for executors and clients on this host
                self._socket_dir = private_folder("grid-member-")
                try:
                    unix = self.transport.listen_unix(os.path.join(self._socket_dir, "member.sock"))
                except TransportError as exc:  # e.g. a TMPDIR too deep for a socket path (~107 bytes)
                    log.info("no Unix socket (%s); processes on this host use TCP", exc)
                    self._remove_socket_dir()
                    self._socket_dir = None
            task_threads = self.config.task_processes or self.config.effective_workers()
            self.me = local_member(self.address, self.uuid, task_threads, unix, data=self.config.data)
            self.discovery = make_discovery(self.config, secret=self.secret, cluster_id=self.config.id,
                                            member_uuid=self.uuid, clock=clock)
            required = parse_address(self.config.required, key="required") if self.config.required else None
            self.membership = Membership(
                me=self.me, transport=self.transport, router=self.router, discovery=self.discovery,
                heartbeat_interval=self.config.heartbeat_interval, failure_timeout=self.config.failure_timeout,
                required=required, clock=clock, partitions=self.config.partitions,
                backup_count=self.config.backup_count)
            # A lite member (data = false) holds no partitions: no data service answers there.
            self.data = DataService(router=self.router, transport=self.transport, membership=self.membership,
                                    split_brain_protection=self.config.split_brain_protection,
                                    merge_policy=self.config.merge_policy) \
                if self.config.data else None
            # Tasks wait until the patch log is replayed (CodeService calls on_ready).
            self.tasks = TaskRunner(self.router, workers=task_threads, hold=True, processes=[
                TaskProcess(self.me.to_wire(), self.config.imports) for _ in range(self.config.task_processes)])
            services.register_handlers(self.router)
            if os.environ.get(SIM_FAULTS_ENV) == "1":  # under the simulator only: its partitions
                self.router.register("sim.faults", self._set_faults)
            self.console = console.ConsoleSessions(self.router, allow_code=self.config.allow_code, member=self.me)
            self.code = CodeService(router=self.router, transport=self.transport, membership=self.membership,
                                    allow_code=self.config.allow_code, request_timeout=self.config.handshake_timeout,
                                    on_ready=lambda: self.tasks.release(self.transport.call_soon))
            worker.set_current_member(self.me)
            self.router.register("status", lambda conn, body: self.status())
            self.router.register("logs", lambda conn, body: self.log_ring.answer(body))
            self.router.register("stop", lambda conn, body: self._stop_requested(body))
        except BaseException:
            for part in ("console", "tasks", "data"):
                if hasattr(self, part):
                    getattr(self, part).close()
            self.transport.close()
            logging.getLogger("grid").removeHandler(self.log_ring)
            self._remove_socket_dir()
            raise
        self._started = False
        self._closed = False
        self._started_at = time.monotonic()
        self._rates = Rates()

    def _on_close(self, conn) -> None:
        self.membership.on_connection_closed(conn)

    def _set_faults(self, conn, body) -> bool:
        """``sim.faults``: simulate a network split inside the transport (see ``net/faults.py``)."""
        if not body:
            self.transport.faults = None
            log.warning("simulated network faults cleared")
            return True
        # A member this one knows is also dialed on its Unix socket: that path is cut too.
        unix = {format_address(m.address): m.unix for m in self.membership.members() if m.unix}
        unreachable = set(body["unreachable"]) | {unix[a] for a in body["unreachable"] if a in unix}
        self.transport.faults = Faults(unreachable, body["refuse_from"])
        log.warning("simulated network faults: %r", self.transport.faults)
        return True

    def start(self, timeout: float | None = None) -> Peer:
        """Discover, join or form the cluster; return once this member is in it.

        Raises:
            JoinError: no cluster could be formed (the error says why).
            DiscoveryError: discovery could not start.
        """
        self._started = True
        try:
            _import_modules(self.config.imports)
            self.discovery.start(self.address)
            self.membership.start()
            self.membership.wait_joined(timeout)
            self.code.start()
            if not self.code.wait_ready(self.config.failure_timeout + self.config.handshake_timeout):
                log.warning("the patch log is not replayed yet; this member takes tasks once it is")
        except BaseException:
            self.close(clean=False)
            raise
        global _running
        if _running is None:
            _running = self
        return self

    def _stop_requested(self, body) -> bool:
        """``python -m grid stop``: leave cleanly, off the IO thread (the answer goes out first).
        The body is ``{"by": who asks}``: anything else is refused (it stops nothing)."""
        if not isinstance(body, dict) or set(body) != {"by"} or not isinstance(body["by"], str):
            raise GridError(f"a 'stop' body is {{'by': str}}, not {messaging.shorten(body)}")
        log.warning("asked to stop by %s: leaving the cluster", body["by"][:100])
        action = self.on_stop if self.on_stop is not None else self.close
        threading.Timer(0.05, action).start()
        return True

    def status(self) -> dict:
        """What ``python -m grid status`` shows of this member (plain data)."""
        master = self.membership.master()
        data = self.data.summary() if self.data is not None else {"owned": 0, "backups": 0, "structures": {}}
        return {"uuid": self.uuid, "address": format_address(self.address), "pid": os.getpid(),
                "role": "master" if master is not None and master.uuid == self.uuid else "member",
                "uptime": time.monotonic() - self._started_at, "allow_code": self.config.allow_code,
                "data": self.config.data, "load": list(os.getloadavg()),
                "tasks": {"workers": self.tasks.workers, "queued": self.tasks.queued, "running": self.tasks.running,
                          "done": self.tasks.tasks_done},
                "partitions": {"owned": data["owned"], "backups": data["backups"]}, "structures": data["structures"],
                "patches": self.code.log_length, "services": services.offered(),
                "members_version": self.membership.version, "members": len(self.membership.members()),
                "table_version": self.membership.partitions().version, "metrics": self.metrics()}

    def metrics(self) -> dict:
        """Counters that only grow, and rates and percentiles of the last seconds (``grid.metrics``)."""
        done, (bytes_in, bytes_out) = self.tasks.tasks_done, self.transport.traffic
        data = self.data
        return {"tasks_done": done, "tasks_per_s": self._rates.rate("tasks", done),
                "task_seconds": percentiles(list(self.tasks.task_seconds)),
                "data_ops": dict(data.op_counts) if data is not None else {},
                "data_ops_by_structure": {f"{kind} {name}": count for (kind, name), count in
                                          list(data.op_by_structure.items())} if data is not None else {},
                "snapshots_sent": data.snapshots[0] if data is not None else 0,
                "snapshots_received": data.snapshots[1] if data is not None else 0,
                "heartbeat_rtt_ms": {uuid[:8]: round(statistics.median(rtts) * 1000, 3)
                                     for uuid, rtts in list(self.membership.heartbeat_rtts.items()) if rtts},
                "bytes_in": bytes_in, "bytes_out": bytes_out,
                "bytes_in_per_s": self._rates.rate("bytes_in", bytes_in),
                "bytes_out_per_s": self._rates.rate("bytes_out", bytes_out)}

    def members(self):
        return self.membership.members()

    def master(self):
        return self.membership.master()

    def partitions(self):
        return self.membership.partitions()

    def close(self, clean: bool = True) -> None:
        """Leave the cluster (cleanly: the others remove us at once) and stop every thread."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            if clean:
                self.membership.leave()
            self.membership.close()
            self.discovery.stop(clean=clean)
        self.code.close()
        self.console.close()
        self.tasks.close()
        if getattr(self, "_events", None) is not None:
            self._events.close()
        if self.data is not None:
            self.data.close()
        self.transport.close()
        logging.getLogger("grid").removeHandler(self.log_ring)
        if worker.current_member() is self.me:  # current_member() must not name a member that is gone
            worker.set_current_member(None)
        global _running
        if _running is self:
            _running = None
        self._remove_socket_dir()

    def event_hub(self) -> EventHub:
        """The entry listeners of this process's handles on this member (made on first use)."""
        with _hub_lock:
            if getattr(self, "_events", None) is None:
                self._events = EventHub(transport=self.transport, router=self.router,
                                        members=self.membership.members, local=self.data)
            return self._events

    def _remove_socket_dir(self) -> None:
        if getattr(self, "_socket_dir", None):
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Peer {format_address(self.address)} {self.membership.state.value}>"


def _import_modules(names) -> None:
    """Import the config's ``imports`` (modules that offer services) before joining."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(f"cannot import {name!r}: {type(exc).__name__}: {exc}; is it on this "
                              "member's sys.path (PYTHONPATH)?", key="imports") from exc
