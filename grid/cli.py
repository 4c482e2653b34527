"""The command line: ``python -m grid peer|members``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from .config import format_address
from .errors import GridError

log = logging.getLogger("grid.cli")

_RESTART_WINDOW = 30.0  # a member that dies more than _MAX_RESTARTS times in this window is not restarted
_MAX_RESTARTS = 5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid", description="grid: a pure-Python compute and data grid")
    commands = parser.add_subparsers(dest="command", required=True)
    peer = commands.add_parser("peer", help="run member processes on this machine")
    peer.add_argument("--config", help="config file (default: the lookup: ./grid.toml, ~/.grid/grid.toml, GRID)")
    peer.add_argument("--procs", type=int, default=None, help="member processes to run (default: the core count)")
    peer.add_argument("--log-level", default=os.environ.get("GRID_LOG_LEVEL", "INFO"))
    peer.add_argument("--stop-on-eof", action="store_true",
                      help="leave the cluster when standard input closes (the parent that started us died)")
    members = commands.add_parser("members", help="print the member list of the configured cluster")
    members.add_argument("--config")
    demo = commands.add_parser("demo", help="an embedded 3-member cluster maps a lambda; who computed what")
    demo.add_argument("--members", type=int, default=3)
    demo.add_argument("--items", type=int, default=24)
    args = parser.parse_args(argv)
    if args.command == "peer":
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
        procs = args.procs if args.procs is not None else (os.cpu_count() or 1)
        if procs < 1:
            parser.error("--procs must be at least 1")
        if procs == 1:
            return run_member(args.config, stop_on_eof=args.stop_on_eof)
        return supervise(procs, args.config, args.log_level)
    if args.command == "members":
        return print_members(args.config)
    if args.command == "demo":
        return run_demo(args.members, args.items)
    return 2


def run_member(config_path: str | None, *, stop_on_eof: bool = False) -> int:
    """Run one member until SIGTERM/SIGINT; print its ready line once it is in the cluster."""
    from .peer import Peer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if stop_on_eof:
        # Daemon on purpose: it blocks in read() until the process ends, and holds nothing.
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), stop.set()), name="stdin-watch",
                         daemon=True).start()
    try:
        peer = Peer(config_path)
    except GridError as exc:
        print(f"grid peer: {exc}", file=sys.stderr)
        return 2
    try:
        peer.start()
    except GridError as exc:
        print(f"grid peer: cannot join: {exc}", file=sys.stderr)
        return 3
    print(f"grid peer ready {format_address(peer.address)} uuid={peer.uuid} pid={os.getpid()} "
          f"cluster={peer.config.id}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("leaving the cluster")
        peer.close(clean=True)
    return 0


def supervise(procs: int, config_path: str | None, log_level: str) -> int:
    """Run ``procs`` member processes, restarting one that dies, until SIGTERM/SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    command = [sys.executable, "-m", "grid", "peer", "--procs", "1", "--log-level", log_level]
    if config_path:
        command += ["--config", config_path]
    children: list[subprocess.Popen] = [subprocess.Popen(command) for _ in range(procs)]
    deaths: list[float] = []
    try:
        while not stop.wait(0.2):
            for index, child in enumerate(children):
                code = child.poll()
                if code is None:
                    continue
                now = time.monotonic()
                deaths = [t for t in deaths if now - t < _RESTART_WINDOW] + [now]
                if len(deaths) > _MAX_RESTARTS:
                    log.error("members keep dying (%d times in %.0f s, last exit code %s); giving up",
                              len(deaths), _RESTART_WINDOW, code)
                    return 1
                log.warning("member process %d exited with code %s; restarting it", child.pid, code)
                children[index] = subprocess.Popen(command)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0


def print_members(config_path: str | None) -> int:
    from .client import connect

    try:
        with connect(config_path) as cluster:
            for index, member in enumerate(cluster.members()):
                role = "master" if index == 0 else "member"
                print(f"{format_address(member.address)}\t{role}\t{member.hostname}\tpid={member.pid}\t{member.uuid}")
    except GridError as exc:
        print(f"grid members: {exc}", file=sys.stderr)
        return 2
    return 0


def run_demo(members: int, items: int) -> int:
    """Start an embedded cluster, fmap a lambda over it, print who computed each item."""
    import collections

    from .executor import GridExecutor
    from .worker import current_member

    started = time.perf_counter()
    os.environ.pop("GRID", None)  # the demo always runs its own private cluster
    with GridExecutor(max_workers=members) as executor:
        ready = time.perf_counter() - started
        print(f"embedded cluster of {len(executor.members())} members up in {ready:.2f} s:")
        for member in executor.members():
            print(f"  {format_address(member.address)}  pid {member.pid}")

        def square_where(x):  # a closure from __main__-like code: it travels by value
            return x, x * x, format_address(current_member().address)

        work_started = time.perf_counter()
        rows = list(executor.map(square_where, range(items), chunksize=1))
        took = time.perf_counter() - work_started
        shares = collections.Counter(where for _, _, where in rows)
        for x, square, where in rows:
            print(f"  {x:4d}^2 = {square:<6d} computed on {where}")
        print(f"{items} items in {took * 1000:.1f} ms; share per member:")
        for where, count in sorted(shares.items()):
            print(f"  {where}: {count} items ({100 * count / items:.0f}%)")
    print(f"done in {time.perf_counter() - started:.2f} s; the cluster is gone")
    return 0
