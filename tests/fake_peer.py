"""A stand-in for ``python -m grid peer`` that speaks the simulator's contract without grid.

Usage: ``python tests/fake_peer.py --config FILE [--procs 1]``. It reads the JSON
config, binds a TCP listener on ``interface``:``port`` (0: the OS chooses; a taken
port moves up, as grid does), registers in the registry folder when ``members`` is
a directory path, prints ``grid peer ready ADDR uuid=U pid=P cluster=ID`` and then
answers every connection with its uuid and a newline, until SIGTERM: then it removes
its registry entry and exits 0. Logs go to stderr.

Test-only config keys (or environment variables):
    fake_exit_code / FAKE_PEER_EXIT_CODE: exit with this code before the ready line.
    fake_log_lines: write this many numbered lines to stderr first.
    fake_hang_before_ready: never print the ready line (wait for SIGTERM).
    fake_ignore_sigterm: ignore SIGTERM (only SIGKILL ends it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import uuid

DEFAULT_PORT = 5701
PORT_ATTEMPTS = 101


class Leave(Exception):
    """SIGTERM arrived: leave cleanly."""


def log(message: str) -> None:
    print(f"fake peer {os.getpid()}: {message}", file=sys.stderr, flush=True)


def raise_leave(signum: int, frame: object) -> None:
    raise Leave


def bind_listener(interface: str, port: int) -> socket.socket:
    candidates = [0] if port == 0 else range(port, port + PORT_ATTEMPTS)
    for candidate in candidates:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((interface, candidate))
        except OSError:
            listener.close()
            continue
        listener.listen(16)
        return listener
    raise OSError(f"no free port in {port}..{port + PORT_ATTEMPTS - 1} on {interface}")


def register(config: dict, host: str, port: int) -> str | None:
    members = config.get("members")
    if not isinstance(members, dict) or not config.get("register_on_join", True):
        return None
    folder = members.get("path", "")
    if not os.path.isdir(folder):
        return None
    name = host if port == DEFAULT_PORT else f"{host}_{port}"
    entry = os.path.join(folder, name)
    with open(entry, "w", encoding="utf-8") as entry_file:
        entry_file.write(socket.gethostname() + "\n")
    log(f"registered {entry}")
    return entry


def serve(listener: socket.socket, member_uuid: str) -> None:
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.sendall(f"{member_uuid}\n".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_peer")
    parser.add_argument("--config", required=True)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as config_file:
        config = json.load(config_file)
    log(f"starting: join {config.get('join')}, port {config.get('port')}, procs {args.procs}")
    for number in range(int(config.get("fake_log_lines", 0))):
        log(f"noise line {number}")
    exit_code = config.get("fake_exit_code", os.environ.get("FAKE_PEER_EXIT_CODE"))
    if exit_code is not None:
        log(f"failing on purpose before ready with exit code {exit_code}")
        return int(exit_code)
    if config.get("fake_ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, raise_leave)
    entry = None
    listener = bind_listener(config.get("interface", "127.0.0.1"), int(config.get("port", DEFAULT_PORT)))
    try:
        host, port = listener.getsockname()[:2]
        entry = register(config, host, port)
        if config.get("fake_hang_before_ready"):
            log("hanging before ready on purpose")
            while True:
                signal.pause()
        member_uuid = uuid.uuid4().hex
        print(
            f"grid peer ready {host}:{port} uuid={member_uuid} pid={os.getpid()} cluster={config.get('id')}",
            flush=True,
        )
        print("fake peer: stdout after ready", flush=True)
        log("ready")
        serve(listener, member_uuid)
    except Leave:
        log("SIGTERM: leaving the cluster")
    finally:
        listener.close()
        if entry is not None:
            os.unlink(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
