"""Private temp folders: a folder whose owner was killed is swept by the next one made."""

import os
import subprocess
import sys

from grid.net import folders


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make(tmp_path, name, owner=None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "log").write_text("kept until swept")
    if owner is not None:
        (folder / "owner").write_text(str(owner))
    return folder


def test_only_folders_of_dead_owners_are_swept(tmp_path):
    dead = make(tmp_path, "grid-embedded-dead", dead_pid())
    alive = make(tmp_path, "grid-embedded-alive", os.getpid())
    unowned = make(tmp_path, "grid-embedded-unowned")  # being made right now, or made by an older grid
    garbled = make(tmp_path, "grid-embedded-garbled", "not a pid")
    other_kind = make(tmp_path, "grid-member-dead", dead_pid())
    assert folders.sweep_abandoned("grid-embedded-", directory=str(tmp_path)) == [str(dead)]
    assert not dead.exists()
    assert alive.exists() and unowned.exists() and garbled.exists() and other_kind.exists()


def test_a_private_folder_names_its_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(folders.tempfile, "tempdir", None)  # re-read TMPDIR
    leftover = make(tmp_path, "grid-test-leftover", dead_pid())
    made = folders.private_folder("grid-test-")
    assert os.path.dirname(made) == str(tmp_path)
    assert (tmp_path / os.path.basename(made) / "owner").read_text() == str(os.getpid())
    assert oct(os.stat(made).st_mode & 0o777) == oct(0o700)
    assert not leftover.exists(), "making a folder sweeps the abandoned ones of its kind"


def test_a_member_whose_temp_folder_is_too_deep_for_a_socket_serves_over_tcp(tmp_path, monkeypatch):
    import grid

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(folders.tempfile, "tempdir", str(deep))
    config = {"id": "folders-deep", "join": "tcp", "members": {"path": str(tmp_path)}, "port": 0, "join_timeout": 0.3}
    peer = grid.Peer(config).start(10)
    try:
        assert peer.me.unix == "", "the socket path would pass the ~107 byte limit"
        assert [path.name for path in deep.iterdir() if path.name.startswith("grid-member-")] == []
        with grid.connect(config) as cluster, grid.GridExecutor(cluster=cluster) as executor:
            assert executor.submit(sum, [1, 2]).result(10) == 3
    finally:
        peer.close()
