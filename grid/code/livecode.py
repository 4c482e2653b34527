"""Cluster-wide code: run, evaluate, execute, load and deploy on every member; the patch log.

::

    caller (client, or a member)        the member it links to            the master
    ----------------------------        ----------------------            ----------
    run_all / eval_all -- "code.run_all" -> "code.run" to every member,
                       <- {uuid: outcome}     itself too, gathered
    exec_all / load_all / deploy
                       -- "code.submit" ---> forwarded to the master ----> appended to the log (next seq),
                                                                            "code.apply" to every member,
                       <- {uuid: outcome} <--------------------------------  itself too, gathered

Every member holds the whole log and runs it in order on one thread ("grid-code").
A member that joins asks the master for the log and replays it before it takes any
task (the TaskRunner holds them); a member that becomes master first pulls the
longest log among the others, so the log survives the death of any one member.
What a patch is, how a caller builds one and how a process applies it: ``patches.py``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from ..cluster.members import local_target
from ..errors import (
    CodeNotAllowed,
    GridError,
    RemoteError,
    RemoteTraceback,
    SomeMembersFailed,
    TransportError,
)
from ..net import messaging, serialize
from .patches import apply_patch, check_module_name, compile_source, namespace

log = logging.getLogger("grid.livecode")

_SYNC_RETRY = 0.5  # seconds between attempts to fetch the log from an unreachable master


class MasterUnavailable(GridError):
    """The master could not be reached to order a patch; the caller retries once a master answers."""


def _run_request(body):
    """Run a ``run_all`` call or an ``eval_all`` expression here; returns its value."""
    if body[0] == "call":
        fn, args, kwargs = serialize.loads(body[1])
        return fn(*args, **kwargs)
    _, expression, module, filename = body
    return eval(compile_source(expression, filename, "eval"), namespace(module).__dict__)


def _outcome_of(fn, *args) -> tuple:
    """``(True, pickled value)`` or ``(False, (pickled exception, traceback text))``: never raises."""
    try:
        value = fn(*args)
    except BaseException as exc:  # noqa: B036 - the caller gets every failure, SystemExit too
        return (False, serialize.pack_error(exc))
    try:
        return (True, serialize.dumps(value))
    except Exception as exc:
        error = RemoteError(f"the result ({type(value).__name__}) cannot be pickled: {exc}; return plain data")
        return (False, serialize.pack_error(error))


def _refused(me) -> tuple:
    return (False, serialize.pack_error(CodeNotAllowed(
        f"member {me} runs with allow_code = false, so it refuses cluster-wide code (run_all, eval_all, "
        "exec_all, load_all, deploy, console); it still runs ordinary tasks. Set allow_code = true in "
        "its config to allow it")))


def _lost(member, reason) -> tuple:
    return (False, serialize.pack_error(RemoteError(f"no answer from member {member}: {reason}")))


# -- the member side ------------------------------------------------------------------------------------

class CodeService:
    """A member's share of cluster-wide code: runs requests, keeps and replays the patch log.

    Args:
        router, transport, membership: the member's own.
        allow_code: False refuses every request to run code (the log is still kept).
        on_ready: called once, when the log is replayed and the member may take tasks.
    """

    def __init__(self, *, router, transport, membership, allow_code: bool, on_ready=None,
                 request_timeout: float = 5.0):
        self.transport = transport
        self.membership = membership
        self.me = membership.me
        self.allow_code = allow_code
        self.request_timeout = request_timeout
        self._on_ready = on_ready
        self._lock = threading.Lock()  # guards _log, _epoch
        self._log: list[dict] = []  # entries in the master's order; entry["seq"] == index + 1
        self._epoch = 0  # bumped by reset_patches
        self._done: dict[str, tuple] = {}  # patch id -> outcome here (code thread only)
        self._ready = threading.Event()
        self._synced_master = None  # uuid of the master whose log this member last adopted
        self._links: dict[str, Future] = {}  # member uuid -> Future[Connection] (any thread, under _lock)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grid-code")
        router.register("code.run", self._on_run)
        router.register("code.run_all", self._on_run_all)
        router.register("code.submit", self._on_submit)
        router.register("code.apply", self._on_apply)
        router.register("code.log", self._on_log)
        router.register("code.patches", self._on_patches)
        router.register("code.reset", self._on_reset)
        self._thread.start()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def log_length(self) -> int:
        """The patches in this member's patch log."""
        return len(self._log)

    def start(self) -> None:
        """The member joined: fetch and replay the log, then follow master changes."""
        self.membership.add_listener(self._on_membership)
        self._jobs.put(self._sync)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop the code thread (after the job it runs) and close this service's links."""
        self._stop.set()
        self._jobs.put(None)
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for future in links:  # closing them fails any request the code thread waits on
            _close_link(future, "code service closed")
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            try:
                job()
            except Exception:
                log.exception("cluster-wide code: a job failed")

    # -- links to other members ----------------------------------------------------------------

    def _link(self, member) -> Future:
        with self._lock:
            future = self._links.get(member.uuid)
            if future is not None and (not future.done() or (not future.exception() and future.result().is_open)):
                return future
            future = self._links[member.uuid] = self.transport.connect(local_target(member))
        return future

    def _request(self, member, message_type: str, body) -> Future:
        """A request to ``member`` (this member itself is not reached this way)."""
        answer: Future = Future()

        def connected(done: Future) -> None:
            error = done.exception()
            if error is not None:
                answer.set_exception(error)
                return
            try:
                messaging.request(done.result(), message_type, body).add_done_callback(relay)
            except GridError as exc:
                answer.set_exception(exc)

        def relay(done: Future) -> None:
            error = done.exception()
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(done.result())

        self._link(member).add_done_callback(connected)
        return answer

    def _on_membership(self, event) -> None:
        if event.kind == "left":
            with self._lock:
                future = self._links.pop(event.member.uuid, None)
            if future is not None:  # its pending requests fail now, not at the failure timeout
                _close_link(future, "member left")
        if len(event.members) == 1 and event.members[0].uuid == self.me.uuid:
            self._synced_master = None  # alone (or removed and rejoining): sync with whoever comes next
            return
        master = event.members[0] if event.members else None
        if master is not None and master.uuid != self._synced_master:
            self._jobs.put(self._sync)

    # -- request handlers (IO thread) ------------------------------------------------------------

    def _on_run(self, conn, body) -> Future:
        return self._submit_job(lambda: _outcome_of(_run_request, body) if self.allow_code else _refused(self.me))

    def _on_run_all(self, conn, body) -> Future:
        return self.run_all(body)

    def _on_submit(self, conn, patch) -> Future:
        return self.submit(patch)

    def _on_apply(self, conn, body) -> Future:
        return self._submit_job(lambda: self._apply_entries(conn, *body))

    def _on_log(self, conn, body) -> tuple:
        with self._lock:
            return (self._epoch, list(self._log))

    def _on_patches(self, conn, body) -> Future:
        return self._at_master("code.patches", body, lambda: self._on_log(None, None))

    def _on_reset(self, conn, body) -> Future:
        return self._at_master("code.reset", body, self._reset)

    def local_request(self, message_type: str, body) -> Future:
        """What a request of ``message_type`` from a client gets, asked by this process itself."""
        handlers = {"code.run_all": self._on_run_all, "code.submit": self._on_submit,
                    "code.patches": self._on_patches, "code.reset": self._on_reset}
        return handlers[message_type](None, body)

    def _submit_job(self, fn) -> Future:
        result: Future = Future()

        def job():
            try:
                result.set_result(fn())
            except BaseException as exc:  # noqa: B036
                result.set_exception(exc)

        self._jobs.put(job)
        return result

    # -- entry points (any thread) ------------------------------------------------------------------

    def run_all(self, body) -> Future:
        """Run a call or an expression on every member; the Future gives ``{uuid: outcome}``."""
        requests = {}
        for member in self.membership.members():
            if member.uuid == self.me.uuid:
                requests[member] = self._on_run(None, body)
            else:
                requests[member] = self._request(member, "code.run", body)
        return self._gather(requests)

    def submit(self, patch: dict) -> Future:
        """Append a patch to the log (at the master) and run it everywhere; ``{uuid: outcome}``."""
        return self._at_master("code.submit", patch, lambda: self._sequence(patch))

    def _at_master(self, message_type: str, body, here) -> Future:
        """Run ``here()`` on the code thread if this member is master, else ask the master."""
        master = self.membership.master()
        if master is None:
            failed: Future = Future()
            failed.set_exception(MasterUnavailable(f"member {self.me} is not in a cluster yet"))
            return failed
        if master.uuid == self.me.uuid:
            result: Future = Future()

            def job():
                if not self.membership.is_master:  # the master changed while this waited
                    result.set_exception(MasterUnavailable("the master changed; try again"))
                    return
                if self._synced_master != self.me.uuid:  # just promoted: take the old master's log first
                    self._sync_as_master()
                try:
                    value = here()
                except BaseException as exc:  # noqa: B036
                    result.set_exception(exc)
                    return
                if isinstance(value, Future):
                    value.add_done_callback(lambda done: _copy(done, result))
                else:
                    result.set_result(value)

            self._jobs.put(job)
            return result
        answer: Future = Future()

        def relayed(done: Future) -> None:
            error = done.exception()
            if error is None:
                answer.set_result(done.result())
            elif isinstance(error, (TransportError, OSError, TimeoutError)):
                answer.set_exception(MasterUnavailable(f"the master {master} did not answer: {error}"))
            else:
                answer.set_exception(error)

        self._request(master, message_type, body).add_done_callback(relayed)
        return answer

    # -- the master's side of the log (code thread) ---------------------------------------------

    def _sequence(self, patch: dict) -> Future:
        with self._lock:
            entry = next((e for e in self._log if e["id"] == patch["id"]), None)
            if entry is None:  # not a retry of one already logged
                entry = dict(patch, seq=len(self._log) + 1, epoch=self._epoch)
                self._log.append(entry)
            epoch = self._epoch
        log.info("patch #%d (%s %s) from %s", entry["seq"], entry["kind"], entry["module"], entry["origin"])
        requests = {}
        for member in self.membership.members():
            if member.uuid != self.me.uuid:
                requests[member] = self._request(member, "code.apply", (epoch, entry["seq"], [entry]))
        mine = self._apply_pending().get(entry["id"]) or self._done.get(entry["id"])
        requests[self.me] = _done_future(mine)
        return self._gather(requests)

    def _reset(self) -> int:
        with self._lock:
            cleared = len(self._log)
            self._epoch += 1
            self._log = []
            epoch = self._epoch
        log.info("the patch log was reset (%d patches cleared; code already run stays)", cleared)
        for member in self.membership.members():
            if member.uuid != self.me.uuid:
                self._request(member, "code.apply", (epoch, 1, []))
        return cleared

    # -- every member's side of the log (code thread) -------------------------------------------

    def _apply_entries(self, conn, epoch: int, start: int, entries: list) -> tuple:
        """Take entries ``start..`` of the master's log, run what is new; the outcome of the last."""
        with self._lock:
            if epoch > self._epoch or start == 1:
                self._epoch, self._log = epoch, list(entries)
            elif epoch < self._epoch:
                log.warning("ignoring patches of an older log (epoch %d, this member has %d)", epoch, self._epoch)
                entries = []
            elif start <= len(self._log) + 1:
                self._log = self._log[:start - 1] + list(entries)
            else:
                entries = None
        if entries is None:  # a gap (this member missed some): take the sender's whole log
            self._adopt_from(conn)
            entries = []
        outcomes = self._apply_pending()
        if entries:
            return outcomes.get(entries[-1]["id"]) or self._done.get(entries[-1]["id"])
        return (True, serialize.dumps(None))

    def _apply_pending(self) -> dict:
        """Run the entries of the log not yet run here, in order; ``{id: outcome}`` of those run."""
        with self._lock:
            pending = [entry for entry in self._log if entry["id"] not in self._done]
        ran = {}
        for entry in pending:
            if entry["id"] in self._done:
                continue
            if self.allow_code:
                outcome = _outcome_of(apply_patch, entry)
                if not outcome[0]:
                    log.warning("patch #%d (%s %s) failed on this member:\n%s", entry["seq"], entry["kind"],
                                entry["module"], outcome[1][1])
            else:
                outcome = _refused(self.me)
            self._done[entry["id"]] = ran[entry["id"]] = outcome
        return ran

    def _adopt_from(self, conn) -> bool:
        """Replace this member's log with the one at the other end of ``conn``; True if it answered."""
        try:
            epoch, entries = messaging.request(conn, "code.log", None).result(self.request_timeout)
        except (TransportError, TimeoutError) as exc:
            log.info("cannot fetch the patch log from %r: %s", conn, exc)
            return False
        except Exception as exc:  # it answered, with a refusal: asking again would not help
            log.error("%r refused the patch log (%s: %s); going on without it", conn, type(exc).__name__, exc)
            return True
        with self._lock:
            self._epoch, self._log = epoch, list(entries)
        return True

    def _sync(self) -> None:
        """Agree with the current master on the log, run what is new, then take tasks."""
        while not self._stop.is_set():
            master = self.membership.master()
            if master is None:
                return  # not in a cluster (rejoining): the next membership event syncs
            if master.uuid == self.me.uuid:
                self._sync_as_master()
                break
            try:
                conn = self._link(master).result(self.request_timeout)
            except Exception as exc:
                log.info("cannot reach the master %s for the patch log (%s); retrying", master, exc)
                self._stop.wait(_SYNC_RETRY)
                continue
            if self._adopt_from(conn):
                self._synced_master = master.uuid
                break
            self._stop.wait(_SYNC_RETRY)
        self._apply_pending()
        if not self._ready.is_set():
            self._ready.set()
            if self._on_ready is not None:
                self._on_ready()

    def _sync_as_master(self) -> None:
        """A new master takes the most advanced log among the members, then hands it to them all."""
        others = [m for m in self.membership.members() if m.uuid != self.me.uuid]
        answers = {member: self._request(member, "code.log", None) for member in others}
        deadline = time.monotonic() + self.request_timeout
        with self._lock:
            best_epoch, best = self._epoch, self._log
        for member, answer in answers.items():
            try:
                epoch, entries = answer.result(max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.info("no patch log from %s: %s", member, exc)
                continue
            if (epoch, len(entries)) > (best_epoch, len(best)):
                best_epoch, best = epoch, entries
        with self._lock:
            changed = (best_epoch, len(best)) != (self._epoch, len(self._log))
            self._epoch, self._log = best_epoch, list(best)
        self._synced_master = self.me.uuid
        if changed or others:
            for member in others:
                self._request(member, "code.apply", (best_epoch, 1, list(best)))

    # -- gathering answers ----------------------------------------------------------------------

    def _gather(self, requests: dict) -> Future:
        """One Future of ``{uuid: outcome}`` for a dict of member -> Future of outcome.

        A member that left the cluster before answering is left out.
        """
        gathered: Future = Future()
        outcomes: dict = {}
        remaining = [len(requests)]
        lock = threading.Lock()
        if not requests:
            gathered.set_result({})
            return gathered

        def one_done(member, done: Future) -> None:
            error = done.exception()
            if error is None:
                outcome = done.result()
            elif all(m.uuid != member.uuid for m in self.membership.members()):
                outcome = None
                log.info("member %s left before answering", member)
            else:
                outcome = _lost(member, error)
            with lock:
                if outcome is not None:
                    outcomes[member.uuid] = outcome
                remaining[0] -= 1
                finished = remaining[0] == 0
            if finished:
                gathered.set_result(outcomes)

        for member, future in requests.items():
            future.add_done_callback(lambda done, member=member: one_done(member, done))
        return gathered


def _close_link(future: Future, reason: str) -> None:
    """Close the connection ``future`` gives, once it does (if it ever opens)."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception() or done.result().close(reason))


def _copy(source: Future, target: Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def _done_future(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# -- the caller's side ------------------------------------------------------------------------------------

def call_body(fn, args, kwargs) -> tuple:
    return ("call", serialize.dumps_function((fn, args, kwargs)))


def eval_body(expression: str, module: str) -> tuple:
    if not isinstance(expression, str):
        raise TypeError(f"eval_all takes an expression as a string, got {type(expression).__name__}")
    check_module_name(module)
    compile(expression, "<eval_all>", "eval")  # a SyntaxError here, before anything is sent
    return ("eval", expression, module, "<eval_all>")

def results_by_member(outcomes: dict, members, what: str) -> dict:
    """``{Member: value}`` from ``{uuid: outcome}``; raises SomeMembersFailed if any member failed."""
    by_uuid = {member.uuid: member for member in members}
    results, errors = {}, {}
    for uuid, (ok, payload) in outcomes.items():
        member = by_uuid.get(uuid) or _unknown_member(uuid)
        if ok:
            try:
                results[member] = serialize.loads(payload)
            except Exception as exc:
                error = RemoteError(f"the result from {member} cannot be unpickled here: {exc}")
                errors[member] = error
            continue
        errors[member] = serialize.unpack_error(payload)
    if errors:
        lines = [f"{what} failed on {len(errors)} of {len(outcomes)} members:"]
        for member, error in errors.items():
            last = str(error.__cause__.text).strip().splitlines()[-1] if isinstance(
                error.__cause__, RemoteTraceback) else f"{type(error).__name__}: {error}"
            lines.append(f"  {member}: {last}")
        lines.append("(.errors has each exception, its remote traceback as __cause__; .results the others)")
        raise SomeMembersFailed("\n".join(lines), results=results, errors=errors)
    return results


def _unknown_member(uuid: str):
    from ..cluster.members import Member

    return Member(uuid=uuid, address=("?", 0), pid=0, hostname="?", workers=0)
