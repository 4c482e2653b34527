"""The handshake, sans-IO: two state machines talking through in-memory frames; TLS contexts."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import types

import pytest

from grid.net import security, wire
from grid.errors import ConfigError, HandshakeError
from grid.net.security import ClientHandshake, HandshakeFailed, ServerHandshake, derive_key
from grid.net.wire import FrameDecoder, Kind, frame_bytes

SECRET = "correct horse battery staple"


def make_pair(*, client_secret=SECRET, server_secret=SECRET, client_cluster="dev", server_cluster="dev"):
    client = ClientHandshake(cluster_id=client_cluster, secret=client_secret, info={"uuid": "c", "role": "client"})
    server = ServerHandshake(cluster_id=server_cluster, secret=server_secret, info={"uuid": "s", "role": "member"})
    return client, server


def over_the_wire(frames: list[tuple]) -> list[tuple]:
    """Send frames through bytes and a pre-authentication decoder, as the transport does."""
    decoder = FrameDecoder()
    data = b"".join(frame_bytes(kind, payload) for kind, payload in frames)
    received = decoder.feed(data)
    while decoder.buffered:
        received += decoder.feed(b"")
    return [(frame.kind, frame.payload) for frame in received]


def run_exchange(client, server) -> list[tuple]:
    """Drive both sides to the end; return the transcript as (sender, kind, payload)."""
    transcript = []
    to_server = client.start()
    assert server.start() == []
    while to_server:
        to_client = []
        for kind, payload in over_the_wire(to_server):
            transcript.append(("client", kind, payload))
            to_client += server.receive(kind, payload)
        to_server = []
        for kind, payload in over_the_wire(to_client):
            transcript.append(("server", kind, payload))
            to_server += client.receive(kind, payload)
    return transcript


def hello_and_challenge(client, server):
    [(_, hello)] = client.start()
    [(_, challenge)] = server.receive(Kind.HELLO, hello)
    return hello, challenge


def refuse_reason(reply) -> str:
    kind, payload = reply
    assert kind == Kind.REFUSE
    assert len(payload) <= wire.HANDSHAKE_LIMIT
    return json.loads(payload)["reason"]


# ------------------------------------------------------------------ the happy path


def test_full_exchange_authenticates_both_sides_and_swaps_info():
    client, server = make_pair()

    transcript = run_exchange(client, server)

    assert [(sender, kind) for sender, kind, _ in transcript] == [
        ("client", Kind.HELLO),
        ("server", Kind.CHALLENGE),
        ("client", Kind.PROOF),
        ("server", Kind.WELCOME),
    ]
    assert client.done and server.done
    assert client.peer_info == {"uuid": "s", "role": "member"}
    assert server.peer_info == {"uuid": "c", "role": "client"}
    assert all(len(payload) <= wire.HANDSHAKE_LIMIT for _, _, payload in transcript)


def test_no_secret_on_both_sides_still_completes():
    client, server = make_pair(client_secret=None, server_secret=None)

    run_exchange(client, server)

    assert client.done and server.done


def test_handshake_payloads_are_json_and_raw_macs_never_pickle():
    client, server = make_pair()

    transcript = run_exchange(client, server)

    hello = json.loads(transcript[0][2])
    assert set(hello) == {"v", "cluster", "nonce", "info", "to", "plain"}
    assert hello["cluster"] == "dev" and len(hello["nonce"]) == 32
    challenge = transcript[1][2]
    assert set(json.loads(challenge[security.MAC_SIZE :])) == {"v", "nonce", "info", "at", "mac"}
    assert len(transcript[2][2]) == security.MAC_SIZE
    for _, _, payload in transcript[:2]:  # the JSON ones; the MAC is 32 random bytes, never decoded
        assert not payload.startswith(b"\x80")  # no pickle protocol header


def test_nonces_come_from_the_injected_random_source():
    calls = []

    def counting_urandom(size):
        calls.append(size)
        return bytes([len(calls)]) * size

    client = ClientHandshake(cluster_id="dev", secret=SECRET, info={}, urandom=counting_urandom)
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={}, urandom=counting_urandom)

    transcript = run_exchange(client, server)

    assert calls == [16, 16]
    assert json.loads(transcript[0][2])["nonce"] == "01" * 16
    assert json.loads(transcript[1][2][security.MAC_SIZE :])["nonce"] == "02" * 16


# ------------------------------------------------------------------ wrong secret, other cluster


def test_wrong_secret_is_caught_by_the_client_which_refuses_the_server():
    client, server = make_pair(client_secret="other secret")
    hello, challenge = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed) as client_error:
        client.receive(Kind.CHALLENGE, challenge)

    assert "the server could not prove the cluster secret" in client_error.value.reason
    assert not client_error.value.by_peer
    assert "secrets differ" in refuse_reason(client_error.value.reply)
    assert not client.done

    with pytest.raises(HandshakeFailed) as server_error:
        server.receive(*client_error.value.reply)

    assert server_error.value.by_peer
    assert server_error.value.reply is None  # nothing to answer a refusal with
    assert server_error.value.reason.startswith("refused by peer: the server could not prove the cluster secret")
    assert not server.done and server.peer_info is None


def test_wrong_secret_is_caught_by_the_server_when_the_client_fakes_a_proof():
    client, server = make_pair()
    hello, challenge = hello_and_challenge(client, server)
    forged = security._mac(derive_key("guess"), b"grid-client", hello, challenge[security.MAC_SIZE :])

    with pytest.raises(HandshakeFailed) as server_error:
        server.receive(Kind.PROOF, forged)

    assert "the client could not prove the cluster secret" in server_error.value.reason
    assert "secrets differ" in refuse_reason(server_error.value.reply)
    assert not server.done and server.peer_info is None

    client.receive(Kind.CHALLENGE, challenge)
    with pytest.raises(HandshakeFailed) as client_error:
        client.receive(*server_error.value.reply)
    assert client_error.value.by_peer
    assert "refused by peer: the client could not prove" in client_error.value.reason


@pytest.mark.parametrize("proof", [b"", b"\0" * security.MAC_SIZE, b"\0" * 1000], ids=["empty", "zeros", "long"])
def test_garbage_proofs_are_refused(proof):
    client, server = make_pair()
    hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed, match="could not prove"):
        server.receive(Kind.PROOF, proof)


def test_secret_on_one_side_only_fails():
    client, server = make_pair(server_secret=None)
    _, challenge = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed, match="secrets differ"):
        client.receive(Kind.CHALLENGE, challenge)


def test_other_cluster_id_is_refused_by_the_server_naming_both():
    client, server = make_pair(client_cluster="staging", server_cluster="prod")
    [(_, hello)] = client.start()

    with pytest.raises(HandshakeFailed) as server_error:
        server.receive(Kind.HELLO, hello)

    reason = refuse_reason(server_error.value.reply)
    assert "'staging'" in reason and "'prod'" in reason
    with pytest.raises(HandshakeFailed) as client_error:
        client.receive(*server_error.value.reply)
    assert client_error.value.by_peer
    assert "'staging'" in client_error.value.reason


def test_a_long_hostile_cluster_id_still_gives_a_refuse_that_fits_the_limit():
    # Raw UTF-8 is 4 bytes an emoji; JSON-escaped in a REFUSE it is 12.
    hostile = {"v": security.PROTOCOL_VERSION, "cluster": "\U0001f4a5" * 990, "nonce": "a" * 32, "info": {}}
    hello = json.dumps(hostile, ensure_ascii=False).encode("utf-8")
    assert len(hello) <= wire.HANDSHAKE_LIMIT
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={})

    with pytest.raises(HandshakeFailed) as error:
        server.receive(Kind.HELLO, hello)

    assert "is not this cluster's 'dev'" in refuse_reason(error.value.reply)
    assert over_the_wire([error.value.reply])  # the client's decoder accepts it


# ------------------------------------------------------------------ tampering and replay


def test_tampered_challenge_body_is_refused():
    client, server = make_pair()
    _, challenge = hello_and_challenge(client, server)
    body = json.loads(challenge[security.MAC_SIZE :])
    body["info"]["role"] = "master"
    tampered = challenge[: security.MAC_SIZE] + json.dumps(body).encode()

    with pytest.raises(HandshakeFailed, match="could not prove"):
        client.receive(Kind.CHALLENGE, tampered)
    assert client.peer_info is None


def test_tampered_challenge_mac_is_refused():
    client, server = make_pair()
    _, challenge = hello_and_challenge(client, server)
    tampered = bytes([challenge[0] ^ 1]) + challenge[1:]

    with pytest.raises(HandshakeFailed, match="could not prove"):
        client.receive(Kind.CHALLENGE, tampered)


@pytest.mark.parametrize("challenge", [b"", b"short", b"x" * security.MAC_SIZE], ids=["empty", "short", "mac-only"])
def test_truncated_challenges_are_refused(challenge):
    client, _ = make_pair()
    client.start()

    with pytest.raises(HandshakeFailed):
        client.receive(Kind.CHALLENGE, challenge)


def test_challenge_answering_another_hello_is_refused():
    client, server = make_pair()
    other_client, _ = make_pair()
    client.start()
    _, challenge_for_other = hello_and_challenge(other_client, server)

    with pytest.raises(HandshakeFailed, match="could not prove"):
        client.receive(Kind.CHALLENGE, challenge_for_other)


def test_proof_replayed_from_an_earlier_session_is_refused():
    client, server = make_pair()
    transcript = run_exchange(client, server)
    old_hello, old_proof = transcript[0][2], transcript[2][2]

    fresh_server = ServerHandshake(cluster_id="dev", secret=SECRET, info={})
    fresh_server.receive(Kind.HELLO, old_hello)  # an eavesdropper replays the whole client side

    with pytest.raises(HandshakeFailed, match="could not prove"):
        fresh_server.receive(Kind.PROOF, old_proof)
    assert not fresh_server.done


def test_replay_would_work_only_if_the_server_reused_its_nonce():
    # The guard above is the server's fresh nonce: with a fixed one the replay passes.
    def fixed(size):
        return b"\7" * size

    client = ClientHandshake(cluster_id="dev", secret=SECRET, info={})
    first = ServerHandshake(cluster_id="dev", secret=SECRET, info={}, urandom=fixed)
    transcript = run_exchange(client, first)
    second = ServerHandshake(cluster_id="dev", secret=SECRET, info={}, urandom=fixed)
    second.receive(Kind.HELLO, transcript[0][2])

    assert second.receive(Kind.PROOF, transcript[2][2]) == [(Kind.WELCOME, b"")]


def test_server_mac_reflected_as_the_client_proof_is_refused():
    client, server = make_pair()
    _, challenge = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed, match="could not prove"):
        server.receive(Kind.PROOF, challenge[: security.MAC_SIZE])


# ------------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    "hello",
    [
        b"",
        b"not json",
        b"\xff\xfe\xfd",
        b"[1, 2, 3]",
        b'"a string"',
        b"{}",
        b"[" * 3000 + b"]" * 3000,
        b'{"v": 1, "cluster": "dev", "nonce": "abc", "info": {}}',
        b'{"v": 1, "cluster": "dev", "nonce": "' + b"a" * 32 + b'", "info": []}',
        b'{"v": 1, "cluster": "dev", "nonce": 12, "info": {}}',
        b'{"v": 99, "cluster": "dev", "nonce": "' + b"a" * 32 + b'", "info": {}}',
        b'{"v": 1, "cluster": "dev", "nonce": "' + b"a" * 32 + b'", "info": {}, "x": "' + b"y" * 5000 + b'"}',
        b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",
    ],
    ids=[
        "empty", "text", "not-utf8", "list", "string", "empty-object", "deeply-nested", "short-nonce",
        "info-not-dict", "nonce-not-str", "version", "oversized", "pickle",
    ],
)
def test_malformed_hello_raises_handshake_error_with_a_refuse(hello):
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={})

    with pytest.raises(HandshakeError) as error:
        server.receive(Kind.HELLO, hello)

    assert isinstance(error.value, HandshakeFailed)
    refuse_reason(error.value.reply)
    assert not server.done


def test_malformed_challenge_body_with_a_valid_mac_raises_handshake_error():
    client, _ = make_pair()
    [(_, hello)] = client.start()
    body = b"[" * 2000
    mac = security._mac(derive_key(SECRET), b"grid-server", hello, body)

    with pytest.raises(HandshakeFailed, match="malformed"):
        client.receive(Kind.CHALLENGE, mac + body)


def test_challenge_without_info_is_refused():
    client, _ = make_pair()
    [(_, hello)] = client.start()
    body = b'{"nonce": "00", "v": %d}' % security.PROTOCOL_VERSION
    mac = security._mac(derive_key(SECRET), b"grid-server", hello, body)

    with pytest.raises(HandshakeFailed, match="no member info"):
        client.receive(Kind.CHALLENGE, mac + body)


@pytest.mark.parametrize("payload", [b"", b"garbage", b"[]", b'{"reason": 5}'], ids=["empty", "text", "list", "number"])
def test_refuse_with_any_payload_is_reported_not_crashed_on(payload):
    client, _ = make_pair()
    client.start()

    with pytest.raises(HandshakeFailed, match="refused by peer") as error:
        client.receive(Kind.REFUSE, payload)

    assert error.value.by_peer and error.value.reply is None


# ------------------------------------------------------------------ unexpected kinds


@pytest.mark.parametrize("kind", [Kind.PROOF, Kind.WELCOME, Kind.CHALLENGE, Kind.MESSAGE, Kind.REQUEST, 99])
def test_server_refuses_anything_but_hello_first(kind):
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={})

    with pytest.raises(HandshakeFailed, match="unexpected") as error:
        server.receive(kind, b"{}")

    assert "waiting-hello" in error.value.reason
    refuse_reason(error.value.reply)


@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.WELCOME, Kind.PROOF, Kind.RESPONSE, 99])
def test_client_refuses_anything_but_challenge_after_hello(kind):
    client, _ = make_pair()
    client.start()

    with pytest.raises(HandshakeFailed, match="unexpected"):
        client.receive(kind, b"")


def test_client_refuses_a_second_challenge_instead_of_welcome():
    client, server = make_pair()
    _, challenge = hello_and_challenge(client, server)
    client.receive(Kind.CHALLENGE, challenge)

    with pytest.raises(HandshakeFailed, match="unexpected CHALLENGE"):
        client.receive(Kind.CHALLENGE, challenge)


def test_server_refuses_a_second_hello():
    client, server = make_pair()
    hello, _ = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed, match="unexpected HELLO"):
        server.receive(Kind.HELLO, hello)


def test_frames_after_the_handshake_are_unexpected():
    client, server = make_pair()
    run_exchange(client, server)

    with pytest.raises(HandshakeFailed):
        server.receive(Kind.HELLO, b"{}")
    with pytest.raises(HandshakeFailed):
        client.receive(Kind.WELCOME, b"")


def test_a_failed_handshake_stays_failed():
    client, server = make_pair()
    hello, challenge = hello_and_challenge(client, server)
    with pytest.raises(HandshakeFailed):
        server.receive(Kind.PROOF, b"wrong")

    good_proof = security._mac(derive_key(SECRET), b"grid-client", hello, challenge[security.MAC_SIZE :])
    with pytest.raises(HandshakeFailed, match="unexpected"):
        server.receive(Kind.PROOF, good_proof)
    assert not server.done


# ------------------------------------------------------------------ derive_key


def test_derive_key_is_a_stable_sha256_of_the_secret():
    assert derive_key("s") == derive_key("s")
    assert len(derive_key("s")) == 32
    assert derive_key("s") != derive_key("t")
    assert derive_key("ü") != derive_key("u")
    assert derive_key(None) == derive_key("")  # no secret: a fixed, public key
    assert derive_key("s") != b"s".ljust(32, b"\0")


# ------------------------------------------------------------------ session keys, identity, version


def pair(client_options=None, server_options=None):
    client = ClientHandshake(cluster_id="dev", secret=SECRET, info={"uuid": "c"}, **(client_options or {}))
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={"uuid": "s", "address": "10.0.0.2:5701"},
                             **(server_options or {}))
    return client, server


def test_both_sides_derive_the_same_keys_one_per_direction_fresh_per_connection():
    client, server = pair()
    run_exchange(client, server)
    again_client, again_server = pair()
    run_exchange(again_client, again_server)

    assert client.send_key == server.receive_key and client.receive_key == server.send_key
    assert client.send_key != client.receive_key
    assert len(client.send_key) == 32
    assert {client.send_key, client.receive_key}.isdisjoint({again_client.send_key, again_client.receive_key})
    assert client.frame_mac and server.frame_mac  # neither said it may go without


def test_keys_need_the_secret_a_relay_that_forwarded_everything_cannot_compute_them():
    client, server = pair()
    transcript = run_exchange(client, server)
    hello, challenge = transcript[0][2], transcript[1][2]
    body = challenge[security.MAC_SIZE :]

    guesses = {security.session_keys(derive_key(guess), hello, body) for guess in (None, "", "dev", "c")}

    assert (client.send_key, client.receive_key) not in guesses
    assert security.session_keys(derive_key(SECRET), hello, body) == (client.send_key, client.receive_key)


def test_the_server_refuses_a_hello_that_dialed_another_address():
    client, server = pair({"dialed": "10.0.0.9:5701"}, {"reached_at": "10.0.0.2:5701"})

    [(_, hello)] = client.start()
    with pytest.raises(HandshakeFailed) as error:
        server.receive(Kind.HELLO, hello)

    reason = refuse_reason(error.value.reply)
    assert "dialed '10.0.0.9:5701' but reached this member at 10.0.0.2:5701" in reason
    assert "relays the connection" in reason


def test_the_dialer_refuses_an_answer_from_another_address_even_if_the_server_does_not_check():
    # The server here does not know where it was reached (at = None): the dialer's own check holds.
    client, server = pair({"dialed": "10.0.0.9:5701"}, {"reached_at": None})
    _, challenge = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed) as error:
        client.receive(Kind.CHALLENGE, challenge)

    reason = refuse_reason(error.value.reply)
    assert "dialed 10.0.0.9:5701 but the member that answered is at None" in reason
    assert "'10.0.0.2:5701'" in reason


@pytest.mark.parametrize("dialed", ["10.0.0.2:5701", "192.168.7.7:5701"])
def test_the_dialer_accepts_the_address_it_reached_or_the_one_the_member_advertises(dialed):
    # 10.0.0.2 is advertised; 192.168.7.7 is where the accepted socket was reached.
    client, server = pair({"dialed": dialed}, {"reached_at": "192.168.7.7:5701"})

    run_exchange(client, server)

    assert client.done and server.done


def test_the_dialer_checks_the_uuid_it_expects():
    client, server = pair({"expect_uuid": "someone-else"})
    _, challenge = hello_and_challenge(client, server)

    with pytest.raises(HandshakeFailed, match="dialed member someone-else at None but 's' answered"):
        client.receive(Kind.CHALLENGE, challenge)


@pytest.mark.parametrize("client_plain, server_plain, expected", [
    (False, False, True), (True, False, True), (False, True, True), (True, True, False)])
def test_the_frame_mac_is_off_only_when_both_sides_would_go_without(client_plain, server_plain, expected):
    client, server = pair({"plain_ok": client_plain}, {"plain_ok": server_plain})

    run_exchange(client, server)

    assert client.frame_mac is server.frame_mac is expected


def test_the_client_refuses_a_server_that_turns_the_mac_off_when_the_client_needs_it():
    client, _ = pair()  # plain_ok False: TCP
    [(_, hello)] = client.start()
    body = json.dumps({"v": security.PROTOCOL_VERSION, "nonce": "b" * 32, "info": {}, "at": None,
                       "mac": False}).encode()
    mac = security._mac(derive_key(SECRET), b"grid-server", hello, body)  # a holder of the secret

    with pytest.raises(HandshakeFailed, match="turned the frame MAC off"):
        client.receive(Kind.CHALLENGE, mac + body)


def test_a_hello_of_another_version_is_refused_naming_both_versions():
    server = ServerHandshake(cluster_id="dev", secret=SECRET, info={})
    hello = json.dumps({"v": 1, "cluster": "dev", "nonce": "a" * 32, "info": {}}).encode()

    with pytest.raises(HandshakeFailed) as error:
        server.receive(Kind.HELLO, hello)

    reason = refuse_reason(error.value.reply)
    assert f"peer speaks grid protocol version 1, this side speaks version {security.PROTOCOL_VERSION}" in reason
    assert "same grid release" in reason


def test_a_challenge_of_another_version_is_refused_naming_both_versions():
    client, _ = pair()
    [(_, hello)] = client.start()
    other = security.PROTOCOL_VERSION + 1
    body = json.dumps({"v": other, "nonce": "b" * 32, "info": {}, "at": None, "mac": True}).encode()
    mac = security._mac(derive_key(SECRET), b"grid-server", hello, body)

    with pytest.raises(HandshakeFailed, match=f"peer speaks grid protocol version {other}, this side speaks version "
                                              f"{security.PROTOCOL_VERSION}"):
        client.receive(Kind.CHALLENGE, mac + body)


# ------------------------------------------------------------------ TLS contexts


def make_pki(folder, *, names=("member",)):
    """A throwaway CA and certificates it signs, as PEM files in ``folder``.

    Returns a namespace with ``ca`` (path) and, per name, ``<name>`` = an object with
    ``cert``, ``key`` and ``ca`` attributes, as ``TlsConfig`` has.
    """
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(path, data):
        with open(path, "wb") as file:
            file.write(data)
        return str(path)

    def write_key(path, key):
        return write(path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def certificate(subject, public_key, issuer, signing_key, *, is_ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        if is_ca:
            builder = builder.add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("grid test CA", ca_key.public_key(), "grid test CA", ca_key, is_ca=True)
    pki = types.SimpleNamespace(ca=write(folder / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(name, key.public_key(), "grid test CA", ca_key, is_ca=False)
        setattr(pki, name, types.SimpleNamespace(
            cert=write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key=write_key(folder / f"{name}.key", key),
            ca=pki.ca,
        ))
    return pki


def tls_in_memory(client_context: ssl.SSLContext, server_context: ssl.SSLContext) -> None:
    """Run a TLS handshake between two contexts over memory BIOs; raise the first SSLError."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_side=False)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            # TLS 1.3: the server judges the client's certificate after the client is done.
            client.write(b"ping")
            server_in.write(client_out.read())
            assert server.read(4) == b"ping"
            return
    raise AssertionError("the TLS handshake did not finish")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), names=("member", "other"))


def test_no_tls_config_gives_no_context():
    assert security.server_context(None) is None
    assert security.client_context(None) is None
    empty = types.SimpleNamespace(cert=None, key=None, ca=None)
    assert security.server_context(empty) is None
    assert security.client_context(empty) is None


def test_contexts_with_a_ca_require_the_peer_certificate(pki):
    server = security.server_context(pki.member)
    client = security.client_context(pki.member)

    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False  # members are addressed by IP; the secret authenticates


def test_contexts_without_a_ca_encrypt_but_do_not_verify(pki):
    no_ca = types.SimpleNamespace(cert=pki.member.cert, key=pki.member.key, ca=None)

    assert security.server_context(no_ca).verify_mode == ssl.CERT_NONE
    assert security.client_context(no_ca).verify_mode == ssl.CERT_NONE
    tls_in_memory(security.client_context(no_ca), security.server_context(no_ca))


def test_contexts_complete_a_mutual_tls_handshake(pki):
    tls_in_memory(security.client_context(pki.member), security.server_context(pki.other))


def test_grid_config_tls_section_is_accepted(pki):
    from grid.cluster.config_tables import TlsConfig

    tls = TlsConfig(cert=pki.member.cert, key=pki.member.key, ca=pki.ca)

    assert security.server_context(tls) is not None
    assert security.client_context(tls) is not None


def test_a_client_certificate_from_another_ca_is_refused(pki, tmp_path):
    stranger = make_pki(tmp_path, names=("stranger",)).stranger

    with pytest.raises(ssl.SSLError):
        tls_in_memory(security.client_context(stranger), security.server_context(pki.member))


def test_a_server_certificate_from_another_ca_is_refused(pki, tmp_path):
    stranger = make_pki(tmp_path, names=("stranger",)).stranger

    with pytest.raises(ssl.SSLError):
        tls_in_memory(security.client_context(pki.member), security.server_context(stranger))


@pytest.mark.parametrize("build", [security.server_context, security.client_context], ids=["server", "client"])
def test_missing_certificate_file_is_a_config_error_naming_tls_cert(build, tmp_path, pki):
    missing = str(tmp_path / "nope.pem")

    with pytest.raises(ConfigError, match="tls.cert") as error:
        build(types.SimpleNamespace(cert=missing, key=pki.member.key, ca=pki.ca))

    assert error.value.key == "tls.cert"
    assert "nope.pem" in str(error.value)


@pytest.mark.parametrize("build", [security.server_context, security.client_context], ids=["server", "client"])
def test_missing_ca_file_is_a_config_error_naming_tls_ca(build, tmp_path, pki):
    missing = str(tmp_path / "no-ca.pem")

    with pytest.raises(ConfigError, match="tls.ca") as error:
        build(types.SimpleNamespace(cert=pki.member.cert, key=pki.member.key, ca=missing))

    assert error.value.key == "tls.ca"
    assert "no-ca.pem" in str(error.value)


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(pki):
    mismatched = types.SimpleNamespace(cert=pki.member.cert, key=pki.other.key, ca=pki.ca)

    with pytest.raises(ConfigError, match="tls.cert"):
        security.server_context(mismatched)


def test_a_garbage_certificate_file_is_a_config_error(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(os.urandom(64))

    with pytest.raises(ConfigError, match="tls.cert"):
        security.client_context(types.SimpleNamespace(cert=str(garbage), key=pki.member.key, ca=pki.ca))
