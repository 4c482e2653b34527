"""Patches: what one entry of the patch log is, how a caller builds one, how a process applies it.

A patch is plain data (a dict): an ``exec`` of source in a named module, or the
source files of a module or package that ``load_all`` or ``deploy`` ships. Code
runs in named module namespaces registered in ``sys.modules`` (never grid's own),
and shipped modules are imported through a finder placed first on ``sys.meta_path``,
so what a patch defines pickles by reference afterwards. ``livecode.py`` orders
patches and carries them to every member.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.util
import linecache
import os
import socket
import sys
import threading
import time
import types
import uuid as uuid_module

_MAX_SHIPPED_BYTES = 64 * 1024 * 1024  # load_all / deploy refuse more source than this


@dataclasses.dataclass(frozen=True)
class Patch:
    """One entry of the patch log.

    ``kind`` is "exec" (``exec_all``), "load" (``load_all``) or "deploy"; ``module``
    the module it runs as; ``files`` the shipped modules (name, original file name);
    ``source`` the code of an exec, or of the module itself for a load or deploy.
    """

    seq: int
    kind: str
    module: str
    origin: str
    submitted: float
    files: tuple
    source: str

    def __str__(self) -> str:
        first = next((line for line in self.source.splitlines() if line.strip()), "")
        return f"#{self.seq} {self.kind} {self.module}: {first[:60]}"


# -- applying a patch in this process ------------------------------------------------------------

class _ShippedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports modules whose source was shipped by ``load_all`` or ``deploy``.

    It sits first on ``sys.meta_path``: deployed code wins over an older copy installed here.
    """

    def __init__(self):
        self.sources: dict[str, tuple[str, bool, str]] = {}  # module name -> (source, is_package, file name)

    def find_spec(self, fullname, path=None, target=None):
        entry = self.sources.get(fullname)
        if entry is None:
            return None
        _, is_package, filename = entry
        spec = importlib.util.spec_from_loader(fullname, self, origin=filename, is_package=is_package)
        spec.has_location = False
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        source, is_package, filename = self.sources[module.__name__]
        module.__file__ = filename
        if is_package:
            module.__path__ = []
        exec(compile_source(source, filename, "exec"), module.__dict__)

    def get_source(self, fullname):
        entry = self.sources.get(fullname)
        return entry[0] if entry else None


_finder = _ShippedFinder()
_finder_lock = threading.Lock()


def _install_finder() -> None:
    with _finder_lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def compile_source(source: str, filename: str, mode: str):
    """``compile()``, keeping the source where tracebacks look for it (members have no such file)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, mode)


def namespace(name: str) -> types.ModuleType:
    """The module ``name`` from ``sys.modules``, created (parents too) if absent."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    parent_name, _, child = name.rpartition(".")
    parent = namespace(parent_name) if parent_name else None
    module = types.ModuleType(name)
    if parent is not None:
        if not hasattr(parent, "__path__"):
            parent.__path__ = []
        setattr(parent, child, module)
    sys.modules[name] = module
    return module


def check_module_name(module) -> str:
    """``module`` if code may run in it (a dotted name, not grid's own or ``__main__``); else ValueError."""
    if not isinstance(module, str) or not module or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"module must be a dotted Python name such as 'user' or 'tools.image', got {module!r}")
    if module == "grid" or module.startswith("grid.") or module == "__main__":
        raise ValueError(f"code does not run in {module!r}: use a module of your own, such as 'user'")
    return module


def apply_patch(patch: dict):
    """Run one patch in this process (a member applying the log, or the caller's local copy)."""
    kind = patch["kind"]
    if kind == "exec":
        module = namespace(patch["module"])
        exec(compile_source(patch["source"], patch["filename"], "exec"), module.__dict__)
        return None
    files = patch["files"]
    _install_finder()
    with _finder_lock:
        _finder.sources.update(files)
    importlib.invalidate_caches()
    # Modules already imported are run again in place (like reload), parents before children.
    for name in sorted(files, key=lambda name: name.count(".")):
        module = sys.modules.get(name)
        if module is not None:
            source, is_package, filename = files[name]
            if is_package and not hasattr(module, "__path__"):
                module.__path__ = []
            module.__file__ = filename
            module.__loader__ = _finder
            exec(compile_source(source, filename, "exec"), module.__dict__)
    _ensure_parents(patch["module"], files)
    importlib.import_module(patch["module"])
    return None


def _ensure_parents(name: str, files) -> None:
    """Make the parent packages of ``name`` that neither were shipped nor exist here (``load_all(p, "a.b")``)."""
    parts = name.split(".")
    for depth in range(1, len(parts)):  # outermost first: find_spec of "a.b" imports "a"
        parent = ".".join(parts[:depth])
        if parent not in files and parent not in sys.modules and importlib.util.find_spec(parent) is None:
            module = namespace(parent)
            if not hasattr(module, "__path__"):
                module.__path__ = []


# -- building a patch (the caller) ---------------------------------------------------------------

def make_patch(kind: str, module: str, *, source: str = "", files=None, filename: str = "") -> dict:
    return {"id": uuid_module.uuid4().hex, "kind": kind, "module": module, "source": source,
            "files": files or {}, "filename": filename, "origin": f"{socket.gethostname()} pid {os.getpid()}",
            "submitted": time.time()}


def exec_patch(source: str, module: str, filename: str | None) -> dict:
    if not isinstance(source, str):
        raise TypeError(f"exec_all takes source code as a string, got {type(source).__name__}")
    check_module_name(module)
    filename = filename or f"<exec_all {module}>"
    compile(source, filename, "exec")  # a SyntaxError here, before anything is sent or logged
    return make_patch("exec", module, source=source, filename=filename)


def load_patch(path, module: str | None) -> dict:
    """A ``load_all`` patch: one ``.py`` file, or a package directory, as module ``module``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        name = check_module_name(module if module is not None else os.path.basename(path.rstrip(os.sep)))
        files = _package_files(path, name)
    elif os.path.isfile(path):
        if not path.endswith(".py"):
            raise ValueError(f"load_all ships Python source: {path} is not a .py file (nor a package directory)")
        name = check_module_name(module if module is not None else os.path.splitext(os.path.basename(path))[0])
        files = {name: (_read_source(path), False, path)}
    else:
        raise FileNotFoundError(f"load_all: no such file or directory: {path}")
    for source, _, filename in files.values():
        compile(source, filename, "exec")
    return make_patch("load", name, source=files[name][0], files=files, filename=files[name][2])


def deploy_patch(module_or_name) -> dict:
    """A ``deploy`` patch: the source of an importable module, or of its whole top-level package."""
    if isinstance(module_or_name, types.ModuleType):
        name = module_or_name.__name__
    elif isinstance(module_or_name, str):
        name = module_or_name
    else:
        raise TypeError(f"deploy takes a module or its name, got {type(module_or_name).__name__}")
    check_module_name(name)
    if name.partition(".")[0] in sys.stdlib_module_names:
        raise ValueError(f"{name} is in the standard library, which every member has; deploy your own modules")
    top = importlib.import_module(name.partition(".")[0])
    spec = getattr(top, "__spec__", None)
    locations = list(getattr(top, "__path__", None) or [])
    if locations:
        root = locations[0]
        if not os.path.isfile(os.path.join(root, "__init__.py")) and len(locations) > 1:
            raise ValueError(f"cannot deploy {top.__name__}: it is a namespace package spread over "
                             f"{len(locations)} folders; deploy a module with a folder of its own")
        files = _package_files(root, top.__name__)
    else:
        origin = getattr(spec, "origin", None) or getattr(top, "__file__", None)
        if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
            raise ValueError(f"cannot deploy {top.__name__}: it has no Python source file ({origin or 'built in'}); "
                             "install it on every member instead")
        files = {top.__name__: (_read_source(origin), False, origin)}
    importlib.import_module(name)
    if name not in files:
        raise ValueError(f"cannot deploy {name}: its source is not a .py file in {top.__name__}'s folder")
    return make_patch("deploy", name, source=files[name][0], files=files, filename=files[name][2])


def _read_source(path: str) -> str:
    with open(path, "rb") as file:
        data = file.read()
    return importlib.util.decode_source(data)


def _package_files(root: str, name: str) -> dict:
    files, total = {}, 0
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d.isidentifier() and d != "__pycache__")
        relative = os.path.relpath(folder, root)
        prefix = name if relative == "." else name + "." + relative.replace(os.sep, ".")
        for filename in sorted(filenames):
            path = os.path.join(folder, filename)
            if filename.endswith((".so", ".pyd")):
                raise ValueError(f"cannot ship {name}: {path} is a compiled extension; install the package "
                                 "on every member instead")
            if not filename.endswith(".py"):
                continue
            stem = filename[:-3]
            if stem == "__init__":
                module_name, is_package = prefix, True
            elif stem.isidentifier():
                module_name, is_package = f"{prefix}.{stem}", False
            else:
                continue
            source = _read_source(path)
            total += len(source)
            if total > _MAX_SHIPPED_BYTES:
                raise ValueError(f"cannot ship {name}: more than {_MAX_SHIPPED_BYTES // 2**20} MiB of source; "
                                 "install it on every member instead")
            files[module_name] = (source, is_package, path)
    if name not in files:  # a folder without __init__.py: an empty package
        files[name] = ("", True, os.path.join(root, "__init__.py"))
    return files


def patches_from(entries) -> list[Patch]:
    return [Patch(seq=e["seq"], kind=e["kind"], module=e["module"], origin=e["origin"], submitted=e["submitted"],
                  files=tuple((name, meta[2]) for name, meta in sorted(e["files"].items())), source=e["source"])
            for e in entries]
