"""The client half of the remote console: ``python -m grid console [ADDRESS]``.

``RemoteConsole`` is a session on one member (``console.ConsoleSessions`` serves it);
``run_console`` wraps it in an interactive loop with prompts, multi-line input,
Ctrl-C handling and readline history in ``~/.grid/console_history``.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import uuid as uuid_module
from concurrent.futures import Future

from .errors import CodeNotAllowed, GridError, TransportError
from .net import messaging
from .net.transport import Transport

log = logging.getLogger("grid.console")

class SessionEnded(GridError):
    """The console session is over (``exit()`` ran on the member); ``exit_code`` says how."""

    def __init__(self, message: str, exit_code=None):
        self.exit_code = exit_code
        super().__init__(message)


class RemoteConsole:
    """A console session on one member, like ``code.InteractiveConsole`` but remote.

    Args:
        config: the client's ``Config`` (its id, secret and TLS settings authenticate the link).
        address: the member's ``(host, port)``.
        on_output: ``fn(text)`` for what the session prints; it runs on the thread that
            called ``push``. Default: write to ``sys.stdout``.

    Raises:
        TransportError, HandshakeError: the member cannot be reached or refused the handshake.
        CodeNotAllowed: the member runs with ``allow_code = false``.
    """

    def __init__(self, config, address: tuple[str, int], *, on_output=None):
        self.address = address
        self.on_output = on_output or _write_stdout
        self.buffer: list[str] = []
        self.info: dict = {}
        self._events: queue.Queue = queue.Queue()
        self._timeout = config.handshake_timeout + 5.0
        router = messaging.Router()
        router.register("console.output", lambda conn, body: self._events.put(("output", body.get("text", ""))))
        self._transport = Transport(cluster_id=config.id, secret=config.resolved_secret(),
                                    info={"uuid": uuid_module.uuid4().hex, "role": "client"},
                                    on_frame=router.on_frame, handshake_timeout=config.handshake_timeout,
                                    tls=config.tls, max_payload=config.max_frame_bytes,
                                    name="grid-io-console-client")
        try:
            self._conn = self._transport.connect(address).result(self._timeout)
            self.info = messaging.request(self._conn, "console.open", {}).result(self._timeout)
        except BaseException:
            self._transport.close()
            raise
        self._session = self.info["session"]

    @property
    def banner(self) -> str:
        """Which member this console runs on, and how to leave."""
        info = self.info
        return (f"grid console on member {info['address']} (pid {info['pid']}, host {info['hostname']}), "
                f"Python {info['python']}\nnamespace: module {info['module']!r} (what exec_all defines there); "
                "exit() or Ctrl-D leaves, Ctrl-C drops the current input")

    def push(self, line: str) -> bool:
        """Add ``line`` to the block being typed and run the block if it is complete.

        Returns:
            True when the block needs more lines (show ``... ``), False when it ran.

        Raises:
            SessionEnded: the code called ``exit()``; the session is over.
            ConnectionClosed: the link to the member was lost.
            KeyboardInterrupt: Ctrl-C twice while waiting (the code may still run there).
        """
        self.buffer.append(line)
        source = "\n".join(self.buffer)
        reply = self._wait(messaging.request(self._conn, "console.push", {"session": self._session,
                                                                        "source": source}))
        if not reply["more"]:
            self.buffer = []
        if reply["ended"]:
            raise SessionEnded("the console session ended", reply["exit_code"])
        return reply["more"]

    def resetbuffer(self) -> None:
        """Forget the lines of the unfinished block."""
        self.buffer = []

    def interrupt(self) -> bool:
        """Raise KeyboardInterrupt in the code the session runs now; False if it runs none."""
        try:
            return bool(messaging.request(self._conn, "console.interrupt",
                                          {"session": self._session}).result(self._timeout))
        except (GridError, TimeoutError):
            return False

    def close(self) -> None:
        """End the session on the member and close the link. Idempotent."""
        try:
            if self._conn.is_open:
                messaging.request(self._conn, "console.close", {"session": self._session}).result(self._timeout)
        except Exception:  # ending anyway; the member also ends a session whose link closed
            pass
        self._transport.close()

    def __enter__(self) -> RemoteConsole:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wait(self, reply: Future) -> dict:
        reply.add_done_callback(lambda done: self._events.put(("done", done)))
        interrupted = False
        while True:
            try:
                kind, value = self._events.get()
            except KeyboardInterrupt:
                if interrupted:  # the code ignores KeyboardInterrupt (or is blocked in C): give up waiting
                    raise
                interrupted = True
                self.interrupt()
                continue
            if kind == "output":
                self.on_output(value)
            elif value is reply:
                self._drain_output()
                return reply.result()

    def _drain_output(self) -> None:
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "output":
                self.on_output(value)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_console(config=None, address: str | None = None, *, stdin=None, stdout=None) -> int:
    """Run an interactive console on a member until ``exit()``, Ctrl-D or end of input.

    Args:
        config: anything ``load_config`` takes (a path, a dict, a Config) or None for the lookup.
        address: ``"host:port"`` of the member; default: the master of the configured cluster.
        stdin: where lines come from (default: the terminal, with readline and history in
            ``~/.grid/console_history`` when it is a tty).
        stdout: where prompts and output go (default: ``sys.stdout``).

    Returns:
        The exit code: 0 after exit()/Ctrl-D (or the code given to ``exit(n)``), 1 when the link
        was lost, 2 when the member cannot be reached or the config is invalid, 3 when the
        member refuses (``allow_code = false``).
    """
    from .cluster.config import load_config
    from .net.address import parse_address

    out = stdout if stdout is not None else sys.stdout

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    try:
        config = load_config(config)
        target = parse_address(address, key="ADDRESS") if address else _master_address(config)
        console = RemoteConsole(config, target, on_output=show)
    except CodeNotAllowed as exc:
        print(f"grid console: refused: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except (GridError, OSError) as exc:
        where = address or "the master of the configured cluster"
        print(f"grid console: cannot open a console on {where}: {exc}", file=sys.stderr)
        return 2
    with console:
        show(console.banner + "\n")
        reader = _LineReader(stdin, out)
        try:
            return _loop(console, reader, show)
        finally:
            reader.close()


def _loop(console: RemoteConsole, reader: _LineReader, show) -> int:
    more = False
    while True:
        try:
            line = reader.read(("... " if more else ">>> "))
        except KeyboardInterrupt:
            show("\nKeyboardInterrupt\n")
            console.resetbuffer()
            more = False
            continue
        except EOFError:
            show("\n")
            return 0
        try:
            more = console.push(line)
        except SessionEnded as ended:
            if ended.exit_code is None or isinstance(ended.exit_code, int):
                return ended.exit_code or 0
            show(f"{ended.exit_code}\n")
            return 1
        except KeyboardInterrupt:
            show("\nstopped waiting; the code may still be running on the member; leaving the console\n")
            return 130
        except TransportError as exc:
            show(f"\ngrid console: lost the link to member {console.info['address']}: {exc}\n")
            return 1
        except GridError as exc:
            show(f"\ngrid console: the member ended the session: {exc}\n")
            return 1


def _master_address(config) -> tuple[str, int]:
    from .client import connect

    with connect(config) as cluster:
        master = cluster.master()
    if master is None:
        raise GridError(f"cluster {config.id!r} has no members")
    return master.address


class _LineReader:
    """Reads console lines: from the terminal through readline (with history), or from a stream."""

    def __init__(self, stdin, out):
        self._stream = stdin
        self._out = out
        self._readline = None
        self._history = os.path.join(os.path.expanduser("~"), ".grid", "console_history")
        if stdin is None and sys.stdin is not None and sys.stdin.isatty():
            try:
                import readline
            except ImportError:
                return
            self._readline = readline
            if "libedit" in (readline.__doc__ or ""):
                readline.parse_and_bind("bind ^I ed-insert")
            else:
                readline.parse_and_bind("tab: tab-insert")  # Tab indents; completion would be of local names
            try:
                readline.read_history_file(self._history)
            except OSError:
                pass
            readline.set_history_length(1000)

    def read(self, prompt: str) -> str:
        if self._stream is None:
            if self._out is sys.stdout:
                return input(prompt)
            self._out.write(prompt)
            self._out.flush()
            return input()
        self._out.write(prompt)
        self._out.flush()
        line = self._stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def close(self) -> None:
        if self._readline is None:
            return
        try:
            os.makedirs(os.path.dirname(self._history), exist_ok=True)
            self._readline.write_history_file(self._history)
        except OSError as exc:
            log.debug("could not save the console history to %s: %s", self._history, exc)
