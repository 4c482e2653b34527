"""The core of grid runs with the standard library alone (cloudpickle hidden)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_members_form_a_cluster_without_cloudpickle():
    script = textwrap.dedent("""
        import sys
        sys.modules["cloudpickle"] = None  # any import of it now fails
        sys.modules["boto3"] = None
        before = set(sys.modules)
        import grid
        config = {"id": "stdlib", "join": "tcp", "port": 0, "interface": "127.0.0.1", "secret": "x"}
        with grid.connect(config, member=True) as first:
            address = "%s:%d" % first.members()[0].address
            second_config = dict(config, members=[address])
            with grid.connect(second_config, member=True) as second:
                assert len(second.members()) == 2, second.members()
                assert second.master() == first.members()[0]
        print("ok", sorted(m for m, module in sys.modules.items() if module is not None and m not in before
                           and m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "grid"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []", "only the standard library and grid were imported"


def test_executor_without_cloudpickle_runs_importable_functions_and_explains_lambdas(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["cloudpickle"] = None
        import grid
        from grid.net.serialize import SerializationError
        with grid.GridExecutor(1) as executor:
            print(executor.submit(divmod, 17, 5).result())
            print(list(executor.map(abs, [-1, -2, 3])))
            try:
                executor.submit(lambda: 1)
            except SerializationError as error:
                print("refused:", error)
    """)
    env = {key: value for key, value in __import__("os").environ.items() if key != "GRID"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "(3, 2)"
    assert lines[1] == "[1, 2, 3]"
    assert lines[2].startswith("refused:") and "pip install cloudpickle" in lines[2]
