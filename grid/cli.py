"""The command line: ``python -m grid peer|members|demo|console|exec|eval``, and ``--version``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from . import __version__
from .cluster.config import Config, load_config
from .cluster.config_check import JOIN_METHODS
from .errors import ConfigError, GridError, SomeMembersFailed
from .net.address import format_address

log = logging.getLogger("grid.cli")

_RESTART_WINDOW = 30.0  # a member that dies more than _MAX_RESTARTS times in this window is not restarted
_MAX_RESTARTS = 5
_CANNOT_START = (2, 3)  # run_member's exit codes for a bad config and for a refused join


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    """``--log-level``: a level name (any case) or number; argparse reports anything else."""
    level = text.strip().upper()
    if level in _LOG_LEVELS or level.isdigit():
        return level
    raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(_LOG_LEVELS)}")


def hazelgrid_version() -> str:
    """The installed hazelgrid's version; the package's own ``__version__`` when it is not installed."""
    import importlib.metadata  # here: about 10 ms that every member's start would pay otherwise

    try:
        return importlib.metadata.version("hazelgrid")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


class _PrintVersion(argparse.Action):
    """``--version``: print it and exit (looked up only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hazelgrid {hazelgrid_version()}")
        parser.exit()


# The ``peer`` flags for common config keys: (flag, argparse dest). The supervisor passes each on.
_PEER_FLAGS = (("--id", "cluster_id"), ("--port", "port"), ("--interface", "interface"), ("--join", "join"),
              ("--members", "members"), ("--secret-file", "secret_file"), ("--log-file", "log_file"))
_PATH_JOINS = {"file": "a members file", "registry": "a registry folder"}  # --join METHOD:PATH


def config_with_flags(config: Config, *, cluster_id: str | None = None, port: str | int | None = None,
                      interface: str | None = None, join: str | None = None, members: str | None = None,
                      secret_file: str | None = None) -> Config:
    """``config`` with the ``peer`` flags that were given (not None) over its values.

    Each flag goes through ``Config.replace``, so it meets the checks a config file's key
    meets, and an error names the flag (as its source) and the key.

    Args:
        cluster_id: ``--id``, the ``id`` key.
        port: ``--port``, the ``port`` key (text from the command line is turned into an int).
        interface: ``--interface``, the ``interface`` key.
        join: ``--join``: multicast, tcp or aws (the ``join`` key; a ``members`` path of the
            config no longer wins over it), or ``file:PATH`` / ``registry:PATH`` (``members =
            {path = PATH}``: a members file / a registry folder).
        members: ``--members``: comma-separated ``host:port`` addresses (the ``members`` key);
            without ``--join`` it means ``join = tcp``.
        secret_file: ``--secret-file``, the ``secret_file`` key (the config's ``secret`` is
            dropped); the file must exist, hold the secret and be the owner's only.

    Returns:
        The validated Config; its ``source`` names the flags given.

    Raises:
        ConfigError: a flag's value is not allowed.
    """
    steps = []  # (the flag as typed, the config changes it makes)
    if cluster_id is not None:
        steps.append((f"--id {cluster_id}", {"id": cluster_id}))
    if port is not None:
        steps.append((f"--port {port}", {"port": _integer_or_text(port)}))
    if interface is not None:
        steps.append((f"--interface {interface}", {"interface": interface}))
    if join is not None:
        steps.append((f"--join {join}", _join_changes(join, config)))
    if members is not None:
        if join is not None and join != "tcp":
            raise ConfigError(f"--members lists the addresses for --join tcp, not with --join {join}; drop "
                              "one of them", key="members", source="the command line")
        addresses = [part.strip() for part in members.split(",") if part.strip()]
        steps.append((f"--members {members}", {"join": "tcp", "members": addresses}))
    if secret_file is not None:
        path = os.path.abspath(os.path.expanduser(secret_file))
        steps.append((f"--secret-file {secret_file}", {"secret": None, "secret_file": path}))
    if not steps:
        return config
    base = config.source
    for flag, changes in steps:
        try:
            config = config.replace(**changes, source=f"the flag {flag}")
            if "secret_file" in changes:
                config.resolved_secret()
        except ConfigError as exc:
            if flag.startswith("--join ") and changes.get("join") not in JOIN_METHODS:
                raise ConfigError(f"{exc}; or file:PATH ({_PATH_JOINS['file']}) or registry:PATH "
                                  f"({_PATH_JOINS['registry']})") from exc
            raise
    return config.replace(source=f"{base}, with the flags {' '.join(flag for flag, _ in steps)}")


def _integer_or_text(value):
    """An int for an integer's text; anything else as it is, for the config check to name."""
    try:
        return int(value)
    except ValueError:
        return value


def _join_changes(text: str, config: Config) -> dict:
    """The config changes of ``--join TEXT``."""
    method, colon, path = text.partition(":")
    if method in _PATH_JOINS:
        source = f"the flag --join {text}"
        if not path.strip():
            raise ConfigError(f"{method} needs the path of {_PATH_JOINS[method]}: --join {method}:PATH",
                              key="members", source=source)
        path = os.path.abspath(os.path.expanduser(path.strip()))
        if method == "registry":
            path = path.rstrip(os.sep) + os.sep  # a path ending in a separator is a registry folder
        elif os.path.isdir(path):
            raise ConfigError(f"{path} is a folder, and a members file is a file; for a registry folder "
                              f"write --join registry:{path}", key="members", source=source)
        return {"join": "tcp", "members": {"path": path}}
    if colon:
        return {"join": text}  # not a method: the config check says so
    changes = {"join": text}
    if not isinstance(config.members, list):  # a members path would win over the method asked for
        changes["members"] = None
    return changes


def _open_log_file(path: str):
    """The log file, appended and line-buffered."""
    return open(path, "a", buffering=1, encoding="utf-8")


def _line_buffered(*streams) -> None:
    """Make ``streams`` flush at every newline, so a task's print() reaches a log file or pipe as it runs."""
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):  # a closed or detached stream
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid", description="grid: a pure-Python compute and data grid")
    parser.add_argument("--version", action=_PrintVersion, help="print the version of hazelgrid and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    peer = commands.add_parser("peer", help="run member processes on this machine")
    peer.add_argument("--config", help="config file (default: the lookup: ./grid.toml, ~/.grid/grid.toml, GRID)")
    peer.add_argument("--procs", type=int, default=None, help="member processes to run (default: the core count)")
    peer.add_argument("--log-level", type=_log_level, default=os.environ.get("GRID_LOG_LEVEL", "INFO"),
                      help="DEBUG, INFO (the default), WARNING, ERROR or CRITICAL; or GRID_LOG_LEVEL")
    peer.add_argument("--stop-on-eof", action="store_true",
                      help="leave the cluster when standard input closes (the parent that started us died)")
    peer.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                      help="import MODULE before joining (e.g. one that offers services); repeatable")
    flags = peer.add_argument_group("config keys", "each flag overrides that key of the config (file or lookup)")
    flags.add_argument("--id", dest="cluster_id", metavar="NAME", help="the cluster's name (`id`)")
    flags.add_argument("--port", metavar="PORT",
                       help="the port to listen on; taken: the next free one; 0: any (`port`)")
    flags.add_argument("--interface", metavar="HOST", help="the interface to bind (`interface`)")
    flags.add_argument("--join", metavar="METHOD",
                       help="multicast, tcp, aws, file:PATH (a members file) or registry:PATH (a registry "
                            "folder) (`join`, `members = {path = ...}`)")
    flags.add_argument("--members", metavar="HOST:PORT,...",
                       help="comma-separated addresses of members to join through; means --join tcp (`members`)")
    flags.add_argument("--secret-file", metavar="PATH",
                       help="a file holding the cluster secret, readable by its owner only (`secret_file`)")
    flags.add_argument("--log-file", metavar="PATH", help="append the log to PATH instead of writing it to stderr")
    members = commands.add_parser("members", help="print the member list of the configured cluster")
    members.add_argument("--config")
    status = commands.add_parser("status", help="what each member is doing: tasks, partitions, structures, code")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the members (default 1)")
    logs = commands.add_parser("logs", help="the members' recent log lines, merged by time")
    logs.add_argument("member", nargs="?", metavar="MEMBER",
                      help="host:port, or the start of the uuid, of one member (default: every member)")
    logs.add_argument("--follow", "-f", action="store_true", help="go on printing new lines (Ctrl-C ends)")
    logs.add_argument("--level", type=_log_level, default="DEBUG", help="the lowest level shown (default: all)")
    logs.add_argument("--lines", "-n", type=int, default=50, help="lines per member at first (default 50)")
    logs.add_argument("--config")
    stop = commands.add_parser("stop", help="make a member leave the cluster cleanly, or every member")
    stop.add_argument("member", nargs="?", metavar="MEMBER", help="host:port, or the start of the uuid")
    stop.add_argument("--all", action="store_true", help="stop every member")
    stop.add_argument("--config")
    dashboard = commands.add_parser("dashboard", help="a live web page of the cluster (loopback, behind the secret)")
    dashboard.add_argument("--port", type=int, default=8701, help="the port to serve on (default 8701; 0: any)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="the interface to bind (default loopback; another one needs a secret)")
    dashboard.add_argument("--config")
    demo = commands.add_parser("demo", help="an embedded 3-member cluster maps a lambda; who computed what")
    demo.add_argument("--members", type=int, default=3)
    demo.add_argument("--items", type=int, default=24)
    console = commands.add_parser("console", help="an interactive Python console on one member")
    console.add_argument("address", nargs="?", metavar="ADDRESS",
                         help="host:port of the member (default: the master of the configured cluster)")
    console.add_argument("--config")
    execute = commands.add_parser("exec", help="execute a Python file on every member (in a named module)")
    execute.add_argument("file", metavar="FILE")
    execute.add_argument("--module", default="user", help="the module to run it in (default: user)")
    execute.add_argument("--config")
    evaluate = commands.add_parser("eval", help="evaluate a Python expression on every member")
    evaluate.add_argument("expression", metavar="EXPR")
    evaluate.add_argument("--module", default="user", help="the module whose names it sees (default: user)")
    evaluate.add_argument("--config")
    args = parser.parse_args(argv)
    if args.command == "peer":
        return run_peer(parser, args)
    if args.command == "members":
        return print_members(args.config)
    if args.command == "status":
        return print_status(args.config, args.json, args.timeout)
    if args.command == "dashboard":
        return run_dashboard(args.config, args.host, args.port)
    if args.command == "logs":
        return print_logs(args.config, args.member, args.follow, args.level, args.lines)
    if args.command == "stop":
        if (args.member is None) == (not args.all):
            parser.error("stop takes a MEMBER or --all (one of them)")
        return stop_members(args.config, args.member)
    if args.command == "console":
        from .console_client import run_console

        return run_console(args.config, args.address)
    if args.command == "exec":
        return run_exec(args.file, args.module, args.config)
    if args.command == "eval":
        return run_eval(args.expression, args.module, args.config)
    if args.command == "demo":
        return run_demo(args.members, args.items)
    return 2


def run_peer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m grid peer``: one member, or ``--procs N`` of them under a supervisor."""
    procs = args.procs if args.procs is not None else (os.cpu_count() or 1)
    if procs < 1:
        parser.error("--procs must be at least 1")
    stream = sys.stderr
    if args.log_file is not None:
        args.log_file = os.path.abspath(os.path.expanduser(args.log_file))
        try:
            stream = _open_log_file(args.log_file)
        except OSError as exc:
            print(f"grid peer: --log-file {args.log_file}: cannot open it: {exc.strerror or exc}", file=sys.stderr)
            return 2
    level = int(args.log_level) if args.log_level.isdigit() else args.log_level
    logging.basicConfig(level=level, stream=stream, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    overrides = {dest: getattr(args, dest) for _, dest in _PEER_FLAGS if dest != "log_file"}
    if procs == 1:
        return run_member(args.config, stop_on_eof=args.stop_on_eof, imports=args.imports, overrides=overrides)
    try:  # refused here once, rather than by every member process
        config_with_flags(load_config(args.config), **overrides)
    except GridError as exc:
        print(f"grid peer: {exc}", file=sys.stderr)
        return 2
    flags = [word for flag, dest in _PEER_FLAGS if getattr(args, dest) is not None
             for word in (flag, getattr(args, dest))]
    return supervise(procs, args.config, args.log_level, imports=args.imports, flags=flags)


def run_member(config_path: str | None, *, stop_on_eof: bool = False, imports=(), overrides=None) -> int:
    """Run one member until SIGTERM/SIGINT; print its ready line once it is in the cluster.

    ``imports`` are modules to import before joining, after those of the config's ``imports``;
    ``overrides`` are ``config_with_flags`` keywords (the ``peer`` flags) applied over the config.
    """
    from .peer import Peer

    _line_buffered(sys.stdout, sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if stop_on_eof:
        # Daemon on purpose: it blocks in read() until the process ends, and holds nothing.
        # It reads the raw descriptor: a thread blocked inside sys.stdin's buffered reader holds
        # its lock, and the interpreter aborts when it finds it held at exit.
        threading.Thread(target=_watch_stdin, args=(stop,), name="stdin-watch", daemon=True).start()
    try:
        config = config_with_flags(load_config(config_path), **(overrides or {}))
        if imports:
            config = config.replace(imports=_merged_imports(config.imports, imports))
        peer = Peer(config)
    except GridError as exc:
        print(f"grid peer: {exc}", file=sys.stderr)
        return 2
    peer.on_stop = stop.set  # (`python -m grid stop`: leave cleanly, and this process exits)
    try:
        peer.start()
    except ConfigError as exc:  # an `imports` module that cannot be imported
        print(f"grid peer: {exc}", file=sys.stderr)
        return 2
    except GridError as exc:
        print(f"grid peer: cannot join: {exc}", file=sys.stderr)
        return 3
    board = _member_dashboard(peer) if peer.config.dashboard else None
    print(f"grid peer ready {format_address(peer.address)} uuid={peer.uuid} pid={os.getpid()} "
          f"cluster={peer.config.id}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("leaving the cluster")
        if board is not None:
            board.close()
        peer.close(clean=True)
    return 0


def _member_dashboard(peer):
    """``dashboard = true``: this member serves the dashboard on its interface (``dashboard_port``)."""
    from .client import Cluster
    from .dashboard import Dashboard

    try:
        board = Dashboard(Cluster.around(peer), host=peer.config.bind_host(), port=peer.config.dashboard_port,
                          secret=peer.secret)
    except OSError as exc:
        log.warning("the dashboard cannot serve on port %d: %s", peer.config.dashboard_port, exc.strerror or exc)
        return None
    if peer.secret is None:  # (a random token, on loopback: this log is the only place that has it)
        log.warning("dashboard: %s", board.url)
    else:  # (a log is no place for what opens it: the token comes from the secret)
        log.warning("dashboard: %s (its token is the one `python -m grid dashboard` prints for this cluster)",
                    board.url.split("#")[0])
    return board


def _watch_stdin(stop: threading.Event) -> None:
    """Set ``stop`` when standard input reaches end of file (or fails)."""
    try:
        while os.read(sys.stdin.fileno(), 65536):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def _merged_imports(configured, extra) -> list[str]:
    """The config's modules, then those of ``--import``, each once, in order."""
    return list(dict.fromkeys([*configured, *extra]))


def supervise(procs: int, config_path: str | None, log_level: str, *, imports=(), flags=()) -> int:
    """Run ``procs`` member processes, restarting one that dies, until SIGTERM/SIGINT.

    Each member imports ``imports`` (``--import``) before it joins, and is given ``flags``
    (the ``peer`` flags for config keys and ``--log-file``, as command-line words).
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    command = [sys.executable, "-m", "grid", "peer", "--procs", "1", "--log-level", log_level]
    if config_path:
        command += ["--config", config_path]
    for module in imports:
        command += ["--import", module]
    command += list(flags)
    children: list[subprocess.Popen] = [subprocess.Popen(command) for _ in range(procs)]
    deaths: list[float] = []
    try:
        while not stop.wait(0.2):
            for index, child in enumerate(children):
                code = child.poll()
                if code is None:
                    continue
                if code in _CANNOT_START:  # its config or its cluster says no: a restart would say it again
                    log.error("member process %d could not start (exit code %d, its error is above); "
                              "stopping the others", child.pid, code)
                    return code
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


def print_status(config_path: str | None, as_json: bool, timeout: float) -> int:
    """``python -m grid status``: a line per member, then the cluster's; 1 if a member did not answer."""
    import json

    from .client import connect

    try:
        with connect(config_path) as cluster:
            status = cluster.status(timeout)
    except GridError as exc:
        print(f"grid status: {exc}", file=sys.stderr)
        return 2
    silent = [uuid for uuid, member in status["members"].items() if not isinstance(member, dict)]
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 1 if silent else 0
    for uuid, member in status["members"].items():
        if not isinstance(member, dict):
            print(f"{uuid[:8]}  did not answer: {member}")
            continue
        tasks, parts = member["tasks"], member["partitions"]
        structures = ", ".join(f"{name} ({info['kind']}, {info['size']})" for name, info in
                               sorted(member["structures"].items())) or "none"
        print(f"{member['address']}  {member['role']}  up {member['uptime']:.0f} s  pid {member['pid']}  "
              f"{'data' if member['data'] else 'lite'}  allow_code={member['allow_code']}  "
              f"load {member['load'][0]:.2f}")
        print(f"    tasks: {tasks['queued']} queued, {tasks['running']} running of {tasks['workers']}, "
              f"{tasks['done']} done;  partitions: {parts['owned']} owned, {parts['backups']} backed up")
        print(f"    structures owned here: {structures}")
        print(f"    patch log: {member['patches']} patches;  services: {', '.join(member['services']) or 'none'}")
    print(f"cluster: {len(status['members'])} members, master {str(status['master'])[:8]}, member list "
          f"version {status['members_version']}, is_safe {status['is_safe']}"
          + (f"; {len(silent)} did not answer" if silent else ""))
    return 1 if silent else 0


def run_dashboard(config_path: str | None, host: str, port: int) -> int:
    """``python -m grid dashboard``: serve the page until Ctrl-C; prints its URL (with the token)."""
    from .client import connect
    from .dashboard import Dashboard

    try:
        with connect(config_path) as cluster:
            board = Dashboard(cluster, host=host, port=port, secret=cluster.config.resolved_secret())
            print(f"grid dashboard: {board.url}", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            finally:
                board.close()
    except OSError as exc:
        print(f"grid dashboard: cannot serve on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except GridError as exc:
        print(f"grid dashboard: {exc}", file=sys.stderr)
        return 2
    return 0


def _chosen(cluster, member: str | None) -> list:
    """The members ``member`` names (host:port, or the start of a uuid); every member for None.

    Raises:
        GridError: it names none (the message lists them).
    """
    members = cluster.members()
    if member is None:
        return members
    chosen = [m for m in members if format_address(m.address) == member or m.uuid.startswith(member)]
    if not chosen:
        raise GridError(f"no member is {member!r}; the members: " +
                        ", ".join(f"{format_address(m.address)} ({m.uuid[:8]})" for m in members))
    return chosen


def print_logs(config_path: str | None, member: str | None, follow: bool, level: str, lines: int) -> int:
    """``python -m grid logs``: each chosen member's recent log lines, merged by time."""
    from .client import connect

    number = int(level) if level.isdigit() else logging.getLevelName(level)
    try:
        with connect(config_path) as cluster:
            chosen = _chosen(cluster, member)
            names = {m.uuid: format_address(m.address) for m in chosen}
            seen: dict = {}
            limit: int | None = lines
            wake = threading.Event()  # (never set: the pause between looks when following)
            while True:
                found = []
                for uuid, answer in cluster.logs(chosen, after=seen, level=number, lines=limit).items():
                    if isinstance(answer, str):
                        print(f"{names[uuid]}: {answer}", file=sys.stderr)
                        continue
                    for seq, when, levelno, logger, text in answer:
                        seen[uuid] = max(seen.get(uuid, 0), seq)
                        found.append((when, names[uuid], levelno, logger, text))
                for when, address, levelno, logger, text in sorted(found):
                    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
                    print(f"{stamp} {address} {logging.getLevelName(levelno)} {logger}: {text}", flush=True)
                if not follow:
                    return 0
                limit = None
                wake.wait(0.5)
    except KeyboardInterrupt:
        return 0
    except GridError as exc:
        print(f"grid logs: {exc}", file=sys.stderr)
        return 2


def stop_members(config_path: str | None, member: str | None) -> int:
    """``python -m grid stop``: the chosen members leave cleanly; 1 if one did not."""
    from .client import connect

    try:
        with connect(config_path) as cluster:
            chosen = _chosen(cluster, member)
            outcome = cluster.stop_members(chosen)
    except GridError as exc:
        print(f"grid stop: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for m in chosen:
        if outcome[m.uuid] is True:
            print(f"{format_address(m.address)} ({m.uuid[:8]}) left the cluster")
        else:
            failed += 1
            print(f"{format_address(m.address)} ({m.uuid[:8]}) did not stop: {outcome[m.uuid]}", file=sys.stderr)
    return 1 if failed else 0


def run_exec(path: str, module: str, config_path: str | None) -> int:
    """Execute the file at ``path`` on every member in ``module``; one line per member.

    Returns:
        0 when it ran everywhere, 1 when it failed on some member (each is printed with its
        remote traceback), 2 when the file cannot be read or the cluster cannot be reached.
    """
    try:
        with open(path, encoding="utf-8") as source_file:
            source = source_file.read()
    except OSError as exc:
        print(f"grid exec: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    # local=False: the shell process ends right after, so running the file here too would
    # only repeat its side effects (the members keep what it defines).
    return _on_every_member(
        "exec", lambda cluster: cluster.exec_all(source, module=module, filename=path, local=False),
        lambda value: "ok", config_path)


def run_eval(expression: str, module: str, config_path: str | None) -> int:
    """Evaluate ``expression`` on every member in ``module``; print ``host:port<TAB>repr(value)``.

    Returns:
        0, 1 or 2 as for ``run_exec``.
    """
    return _on_every_member("eval", lambda cluster: cluster.eval_all(expression, module=module), repr, config_path)


def _on_every_member(command: str, call, describe, config_path: str | None) -> int:
    from .client import connect

    try:
        with connect(config_path) as cluster:
            try:
                results, errors = call(cluster), {}
            except SomeMembersFailed as exc:
                results, errors = exc.results, exc.errors
    except (SyntaxError, ValueError) as exc:  # raised before anything was sent
        import traceback

        print(f"grid {command}: " + "".join(traceback.format_exception_only(exc)).rstrip(), file=sys.stderr)
        return 2
    except GridError as exc:
        print(f"grid {command}: {exc}", file=sys.stderr)
        return 2
    for member, value in results.items():
        print(f"{format_address(member.address)}\t{describe(value)}", flush=True)
    for member, error in errors.items():
        print(f"{format_address(member.address)}\tFAILED\t{type(error).__name__}: {error}", file=sys.stderr)
        print(_indented(_remote_traceback(error)), file=sys.stderr)
    if errors:
        print(f"grid {command}: failed on {len(errors)} of {len(results) + len(errors)} members", file=sys.stderr)
        return 1
    return 0


def _remote_traceback(error: BaseException) -> str:
    """The traceback text of a member's exception (its ``__cause__``), or of the error itself."""
    import traceback

    cause = error.__cause__
    if cause is not None:
        text = getattr(cause, "text", None)
        return text if isinstance(text, str) else str(cause)
    return "".join(traceback.format_exception(error))


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def run_demo(members: int, items: int) -> int:
    """Start an embedded cluster, fmap a lambda over it, print who computed each item."""
    import collections

    from .client import GridExecutor
    from .compute.worker import current_member

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
