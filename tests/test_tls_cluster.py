"""TLS end to end: real member processes (``python -m grid peer``) with a ``[tls]`` table.

Every member of a ``LocalCluster`` gets the same ``tls = {cert, key, ca}``: a member
certificate signed by a throwaway test CA written to ``tmp_path`` (loopback only).
Members listen for TLS only, so a cluster that forms at all formed over TLS; the
client and executor links are checked to be TLS sockets in this process. Clients
without TLS, or with a certificate from another CA, must be refused while the
members keep serving the good client.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import ssl
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

import grid
from grid.errors import NotConnected
from grid.net.transport import Transport
from grid.net.wire import HEADER, Kind

from . import executor_helpers as helpers
from .conftest import wait_for
from .test_security import make_pki  # a throwaway CA (skips when `cryptography` is missing)

pytestmark = pytest.mark.slow

WAIT = 30.0  # deadline for things that take well under a second; only reached when a test fails
FAST = {"heartbeat_interval": 0.2, "failure_timeout": 1.5}
REFUSAL_TIMEOUT = 1.0  # how long a refused client keeps trying before connect() gives up
HANDSHAKE_TIMEOUT = 2.0  # the refusal test's members and clients: a connect attempt's longest wait
ONE_MEGABYTE = 1024 * 1024
STALL_WAIT = 2.0  # a frame already in the socket arrives in milliseconds; this long means it is stuck


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA with a certificate for the members and one for the clients."""
    return make_pki(tmp_path_factory.mktemp("pki"), names=("member", "client"))


def tls_table(credentials) -> dict:
    """The ``[tls]`` table for one certificate of ``make_pki``."""
    return {"cert": credentials.cert, "key": credentials.key, "ca": credentials.ca}


def tls_cluster(local_cluster, pki, n: int = 3, **config):
    """``n`` members, all speaking TLS with the member certificate."""
    return local_cluster(n, tls=tls_table(pki.member), **config)


def client_config(cluster, credentials=None) -> dict:
    """``cluster.config()`` plus a ``[tls]`` table (none: a plain client)."""
    config = cluster.config()
    if credentials is not None:
        config["tls"] = tls_table(credentials)
    return config


def live_uuids(cluster) -> set[str]:
    return {peer.uuid for peer in cluster.peers if peer.alive}


def sees_exactly(client, uuids) -> bool:
    return {member.uuid for member in client.members()} == set(uuids)


def is_tls(conn) -> bool:
    """True when ``conn`` runs over a completed TLS session."""
    sock = conn._sock
    return isinstance(sock, ssl.SSLSocket) and sock.version() is not None


def client_link(client):
    """The open connection of a client ``Cluster`` to the member it talks to."""
    conn = client._link._conn
    assert conn is not None and conn.is_open
    return conn


def executor_links(executor) -> list:
    """The executor's open links to members."""
    return [link.conn for link in executor._links.values()]


def assert_runs_work(client, expected_pids) -> None:
    """A fresh executor over ``client`` runs a map, a task on every member and 1 MB each way, over TLS."""
    executor = grid.GridExecutor(cluster=client)
    try:
        assert list(executor.map(helpers.square, range(50), timeout=WAIT)) == [x * x for x in range(50)]

        pids = {member.uuid: future.result(WAIT) for member, future in executor.submit_to_all(os.getpid).items()}
        assert set(pids.values()) == set(expected_pids)

        links = executor_links(executor)
        assert len(links) == len(expected_pids)
        assert all(is_tls(conn) for conn in links), f"executor links not all TLS: {links}"

        payload = os.urandom(ONE_MEGABYTE) + b"end"  # one frame far above a TLS record (16 KiB)
        for member in executor.members():
            echoed = executor.submit_to_member(member, helpers.identity, payload).result(WAIT)
            assert len(echoed) == len(payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    finally:
        executor.shutdown(wait=True)


# ------------------------------------------------------------------ formation and work


def test_members_form_one_cluster_over_tls_and_run_work(local_cluster, pki):
    cluster = tls_cluster(local_cluster, pki)
    with grid.connect(client_config(cluster, pki.client)) as client:
        wait_for(lambda: sees_exactly(client, live_uuids(cluster)), WAIT, "the client to see 3 TLS members")
        assert len(client.members()) == 3
        assert is_tls(client_link(client))

        assert_runs_work(client, [peer.pid for peer in cluster.peers])

        module = f"tls_check_{uuid.uuid4().hex}"
        done = client.exec_all("answer = 6 * 7", module=module, local=False)  # local=False: this process stays clean
        assert {member.uuid for member in done} == live_uuids(cluster)
        assert set(done.values()) == {None}
        values = client.eval_all("answer * 2", module=module)
        assert {member.uuid: value for member, value in values.items()} == dict.fromkeys(live_uuids(cluster), 84)


# ------------------------------------------------------------------ refusal


def test_clients_without_tls_or_with_a_foreign_certificate_are_refused(local_cluster, pki, tmp_path):
    cluster = tls_cluster(local_cluster, pki, handshake_timeout=HANDSHAKE_TIMEOUT)
    stranger = make_pki(tmp_path, names=("stranger",)).stranger  # its own CA, unknown to the members
    bad_clients = {
        "no TLS": None,
        "a certificate from another CA": stranger,
        # Trusts the members, so only the members' check of the client certificate can refuse it.
        "a foreign certificate that trusts the cluster CA": SimpleNamespace(cert=stranger.cert, key=stranger.key,
                                                                           ca=pki.ca),
    }
    with grid.connect(client_config(cluster, pki.client)) as good:
        wait_for(lambda: sees_exactly(good, live_uuids(cluster)), WAIT, "the good client to see 3 members")

        for label, credentials in bad_clients.items():
            started = time.monotonic()
            with pytest.raises(NotConnected) as refused:
                grid.connect(client_config(cluster, credentials), timeout=REFUSAL_TIMEOUT).close()
            elapsed = time.monotonic() - started
            # It gives up at its own deadline (plus at most one handshake wait), not never.
            assert elapsed < REFUSAL_TIMEOUT + HANDSHAKE_TIMEOUT + 1.0, \
                f"the client with {label} took {elapsed:.1f} s to be refused"
            assert cluster.cluster_id in str(refused.value)

        # The members logged why: plain bytes where TLS was expected, and a client
        # certificate their CA did not sign. Every member is still up and serving.
        for why in ("wrong version number", "certificate verify failed"):
            wait_for(lambda: any(re.search(rf"TLS handshake with \S+ failed: .*{why}", cluster.log(peer.index), re.I)
                                 for peer in cluster.peers),
                     WAIT, f"a member to log a TLS handshake refused for {why!r}")
        assert all(peer.popen.poll() is None for peer in cluster.peers)
        assert sees_exactly(good, live_uuids(cluster))
        assert is_tls(client_link(good))
        assert_runs_work(good, [peer.pid for peer in cluster.peers])

    with grid.connect(client_config(cluster, pki.client)) as again:
        assert is_tls(client_link(again))
        wait_for(lambda: sees_exactly(again, live_uuids(cluster)), WAIT, "a new good client to see 3 members")


# ------------------------------------------------------------------ failure


def test_a_killed_member_is_removed_and_the_survivors_keep_working_over_tls(local_cluster, pki):
    cluster = tls_cluster(local_cluster, pki, **FAST)
    with grid.connect(client_config(cluster, pki.client)) as client:
        wait_for(lambda: sees_exactly(client, live_uuids(cluster)), WAIT, "the client to see 3 members")
        executor = grid.GridExecutor(cluster=client)  # linked to all 3 before the kill
        try:
            assert list(executor.map(helpers.square, range(30), timeout=WAIT)) == [x * x for x in range(30)]
            master_uuid = client.master().uuid
            linked_uuid = client_link(client).peer_info.get("uuid")
            # Neither the master nor the member this client talks through: the members must notice.
            victim = next(p for p in cluster.peers if p.uuid not in (master_uuid, linked_uuid))

            cluster.kill(victim.index)

            wait_for(lambda: sees_exactly(client, live_uuids(cluster)), WAIT, "the killed member to be removed")
            assert len(client.members()) == 2
            assert client.master().uuid == master_uuid
            # The executor that knew the victim goes on with the survivors, over TLS.
            wait_for(lambda: victim.uuid not in executor._links, WAIT, "the executor to drop its link to the victim")
            assert list(executor.map(helpers.square, range(30), timeout=WAIT)) == [x * x for x in range(30)]
            assert all(is_tls(conn) for conn in executor_links(executor))
        finally:
            executor.shutdown(wait=True)
        assert_runs_work(client, [peer.pid for peer in cluster.peers if peer.alive])
        values = client.eval_all("6 * 7")
        assert {member.uuid for member in values} == live_uuids(cluster)
        assert set(values.values()) == {42}

    with grid.connect(client_config(cluster, pki.client)) as fresh:
        assert is_tls(client_link(fresh))
        wait_for(lambda: sees_exactly(fresh, live_uuids(cluster)), WAIT, "a new client to see the 2 survivors")


# ------------------------------------------------------------------ a TLS read that stops inside a record
# Connection._receive reads at most 256 KiB per event; when it stops inside an SSL record, the rest
# sits decrypted inside OpenSSL while the kernel socket is empty, so select() would not wake the
# connection again: the frame waited for the peer's next frame (forever on an idle executor link).


def test_a_frame_ending_inside_a_partly_read_tls_record_is_delivered(pki):
    # Transport level, in this process: the only way to line the records up deterministically.
    gate, blocked, sizes = threading.Event(), threading.Event(), queue.Queue()

    def on_frame(conn, frame):
        if bytes(frame.payload) == b"block":
            blocked.set()
            gate.wait(WAIT)  # holds the IO thread so what follows is read in one batch
        else:
            sizes.put(len(frame.payload))

    server = Transport(cluster_id="tls-stall", secret="s", info={"uuid": "server"}, tls=pki.member,
                       on_frame=on_frame)
    client = Transport(cluster_id="tls-stall", secret="s", info={"uuid": "client"}, tls=pki.client)
    try:
        server.listen("127.0.0.1", 0)
        conn = client.connect(server.address).result(WAIT)
        conn.send_frame(Kind.MESSAGE, b"block")
        assert blocked.wait(WAIT)
        conn.send_frame(Kind.MESSAGE, b"a" * 100)  # one small record ...
        big = 256 * 1024 - HEADER.size  # ... then a frame of 16 full records
        conn.send_frame(Kind.MESSAGE, b"b" * big)
        wait_for(lambda: not conn._out, WAIT, "the client to hand every byte to the kernel")

        gate.set()

        assert sizes.get(timeout=WAIT) == 100
        try:
            delivered = sizes.get(timeout=STALL_WAIT)
        except queue.Empty:
            delivered = None
        assert delivered == big, "the big frame stalled inside the TLS layer"
    finally:
        gate.set()
        client.close()
        server.close()
