"""Authentication and TLS, sans-IO.

The handshake is a mutual HMAC-SHA256 challenge-response over the cluster
secret, bound to the whole transcript, and it keys the link that follows::

    client                                            server
    HELLO     {v, cluster, nonce_c, info, to, plain}  ->
                                                    <-  CHALLENGE mac_s + {v, nonce_s, info, at, mac}
    (client checks mac_s, v, and that `at` is whom it dialed)
    PROOF     mac_c                                 ->
                                                    <-  WELCOME   (or REFUSE {reason})

    key   = SHA-256("grid-cluster-key" | secret)
    mac_s = HMAC(key, "grid-server" | hello | challenge body)
    mac_c = HMAC(key, "grid-client" | hello | challenge body)
    k_c2s = HMAC(key, "grid-session-c2s" | hello | challenge body)   client -> server frames
    k_s2c = HMAC(key, "grid-session-s2c" | hello | challenge body)   server -> client frames

Both sides prove the secret on fresh random nonces; the role label keeps a
proof from being reflected back. Handshake payloads are raw bytes and JSON,
never pickle, and at most ``wire.HANDSHAKE_LIMIT`` bytes. The transport drives
these objects and enforces the timeout.

Who is on the other end. ``to`` is the address the client's socket reached (its
peer address: a Unix socket's path or ``host:port``); ``at`` is the address the
server's accepted socket was reached at (its local address). The client refuses a
challenge whose ``at`` (or advertised ``info["address"]``) is not what it dialed,
and the uuid it expects, if it names one; the server refuses a hello whose ``to``
is not itself. A relay that forwards a member's handshake to another member is
refused by both: it was dialed at its own address, and the answer comes from the
other's. Both checks are inside the MACed transcript, which a relay cannot redo.

The frame MAC. After WELCOME every frame, both ways, carries HMAC-SHA256 under its
direction's session key over the frame and its sequence number (``wire``), so a
relay or anyone without the secret cannot inject, alter, replay or reorder a frame
even on a link it carries. The keys come from the secret and the whole transcript
(both nonces, both identities), fresh for every connection. ``plain`` says the
client would go without the MAC (its transport already guarantees who is at the
other end and that bytes arrive unaltered: TLS with verified certificates, or a
Unix socket whose peer runs as our uid); ``mac`` is the server's decision, on
unless both sides would go without it. On TCP without verified TLS it is always on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import ssl

from ..errors import ConfigError, HandshakeError
from .wire import HANDSHAKE_LIMIT, Kind

PROTOCOL_VERSION = 5  # 2: the session keys and the frame MAC, `to` and `at`; 3: a map chunk may be a range; 4: a data Op carries its map's limits; 5: a data op travels as a tuple of its fields
MAC_SIZE = 32
_NONCE_BYTES = 16


def derive_key(secret: str | None) -> bytes:
    """The HMAC key for a cluster secret (no secret: a fixed, public key)."""
    material = (secret or "").encode("utf-8")
    return hashlib.sha256(b"grid-cluster-key\0" + material).digest()


def session_keys(key: bytes, hello: bytes, challenge_body: bytes) -> tuple[bytes, bytes]:
    """The link's two frame-MAC keys, ``(client_to_server, server_to_client)``, from the transcript."""
    return (_mac(key, b"grid-session-c2s", hello, challenge_body),
            _mac(key, b"grid-session-s2c", hello, challenge_body))


def _mac(key: bytes, label: bytes, *pieces: bytes) -> bytes:
    mac = hmac.new(key, label, hashlib.sha256)
    for piece in pieces:
        mac.update(len(piece).to_bytes(4, "big"))
        mac.update(piece)
    return mac.digest()


def _json(payload) -> dict:
    """Parse a handshake JSON object; anything else is a HandshakeFailed carrying a REFUSE."""
    payload = bytes(payload)
    if len(payload) > HANDSHAKE_LIMIT:
        _malformed(f"{len(payload)} bytes, over the limit of {HANDSHAKE_LIMIT}")
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting
        _malformed(str(exc)[:200])
    if not isinstance(value, dict):
        _malformed("not a JSON object")
    return value


def _malformed(detail: str):
    reason = f"malformed handshake message: {detail}"
    raise HandshakeFailed(reason, reply=(Kind.REFUSE, refuse_payload(reason)))


def _encode(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _shown(value, limit: int = 80) -> str:
    """``repr`` of a value the peer sent, cut short: it goes into logs and a REFUSE."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind_name(kind) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind!r}"


def _version_mismatch(theirs) -> str:
    return (f"the peer speaks grid protocol version {_shown(theirs)}, this side speaks version "
            f"{PROTOCOL_VERSION}; run the same grid release on every member and client")


def refuse_payload(reason: str) -> bytes:
    """The REFUSE payload for ``reason``, cut so the frame stays within HANDSHAKE_LIMIT."""
    reason = reason[:1000]
    payload = _encode({"reason": reason})
    while len(payload) > HANDSHAKE_LIMIT:  # JSON escapes can make a character 12 bytes
        reason = reason[: len(reason) // 2]
        payload = _encode({"reason": reason})
    return payload


class HandshakeFailed(HandshakeError):
    """The handshake failed; ``reply`` is the REFUSE frame to send before closing (or None)."""

    def __init__(self, reason: str, *, reply: tuple | None = None, by_peer: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.by_peer = by_peer


class _Handshake:
    """The state both sides share. Once ``done``: ``frame_mac`` says whether the frames that
    follow carry a MAC, and ``send_key`` / ``receive_key`` are this side's keys for them."""

    def __init__(self, *, cluster_id: str, secret: str | None, info: dict, urandom=os.urandom,
                 plain_ok: bool = False):
        self.cluster_id = cluster_id
        self._key = derive_key(secret)
        self.info = info
        self._urandom = urandom
        self.plain_ok = plain_ok
        self.done = False
        self.peer_info: dict | None = None
        self.frame_mac = True
        self.send_key: bytes | None = None
        self.receive_key: bytes | None = None
        self._state = "waiting-hello"

    def _finish(self, hello: bytes, body: bytes, *, client: bool) -> None:
        to_server, to_client = session_keys(self._key, hello, body)
        self.send_key, self.receive_key = (to_server, to_client) if client else (to_client, to_server)
        self._state = "done"
        self.done = True

    def receive(self, kind: Kind, payload) -> list[tuple]:
        """Take one frame from the peer; return the frames to send back.

        Raises:
            HandshakeFailed: on any mismatch, with the REFUSE to send (if any) as
                ``reply``. The handshake then stays failed.
        """
        try:
            return self._receive(kind, payload)
        except HandshakeFailed:
            self._state = "failed"
            raise

    def _receive(self, kind: Kind, payload) -> list[tuple]:
        raise NotImplementedError

    def _fail(self, reason: str, *, tell_peer: bool = True):
        reply = (Kind.REFUSE, refuse_payload(reason)) if tell_peer else None
        raise HandshakeFailed(reason, reply=reply)

    def _refused(self, payload):
        try:
            reason = str(_json(payload).get("reason", "no reason given"))
        except HandshakeError:
            reason = "no reason given"
        raise HandshakeFailed(f"refused by peer: {reason}", by_peer=True)


class ClientHandshake(_Handshake):
    """The connecting side. ``start()`` gives HELLO; feed it every frame it gets.

    Args:
        dialed: the address this side's socket reached (``host:port`` or a Unix socket's
            path, see ``connection.endpoint``); the server must answer from there. None
            skips the check (sans-IO tests); a Connection always passes it.
        expect_uuid: the uuid of the member this side means to reach, if it knows it.
        plain_ok: this side would go without the frame MAC (see the module docstring).
    """

    def __init__(self, *, dialed: str | None = None, expect_uuid: str | None = None, **options):
        super().__init__(**options)
        self.dialed = dialed
        self.expect_uuid = expect_uuid

    def start(self) -> list[tuple]:
        self._nonce = self._urandom(_NONCE_BYTES).hex()
        self._hello = _encode(
            {"v": PROTOCOL_VERSION, "cluster": self.cluster_id, "nonce": self._nonce, "info": self.info,
             "to": self.dialed, "plain": self.plain_ok}
        )
        self._state = "hello-sent"
        return [(Kind.HELLO, self._hello)]

    def _receive(self, kind: Kind, payload) -> list[tuple]:
        if kind == Kind.REFUSE:
            self._refused(payload)
        if self._state == "hello-sent" and kind == Kind.CHALLENGE:
            payload = bytes(payload)
            mac_s, body = payload[:MAC_SIZE], payload[MAC_SIZE:]
            expected = _mac(self._key, b"grid-server", self._hello, body)
            if len(mac_s) != MAC_SIZE or not hmac.compare_digest(mac_s, expected):
                self._fail("the server could not prove the cluster secret: the secrets differ")
            challenge = _json(body)
            if challenge.get("v") != PROTOCOL_VERSION:
                self._fail(_version_mismatch(challenge.get("v")))
            info = challenge.get("info")
            if not isinstance(info, dict):
                self._fail("malformed challenge: no member info")
            self._check_identity(challenge.get("at"), info)
            mac = challenge.get("mac")
            if not isinstance(mac, bool) or not mac and not self.plain_ok:
                self._fail("the server turned the frame MAC off on a link that needs it (TCP without verified TLS)")
            self.peer_info = info
            self.frame_mac = mac
            self._body = body
            self._state = "proof-sent"
            return [(Kind.PROOF, _mac(self._key, b"grid-client", self._hello, body))]
        if self._state == "proof-sent" and kind == Kind.WELCOME:
            self._finish(self._hello, self._body, client=True)
            return []
        self._fail(f"unexpected {_kind_name(kind)} during the handshake (state {self._state})")

    def _check_identity(self, at, info: dict) -> None:
        if self.dialed is not None and self.dialed not in (at, info.get("address")):
            self._fail(
                f"dialed {self.dialed} but the member that answered is at {_shown(at)} (it advertises "
                f"{_shown(info.get('address'))}): something in between relays the connection; not linking")
        if self.expect_uuid is not None and info.get("uuid") != self.expect_uuid:
            self._fail(f"dialed member {self.expect_uuid} at {self.dialed} but {_shown(info.get('uuid'))} answered")


class ServerHandshake(_Handshake):
    """The accepting side: waits for HELLO, challenges, checks the proof.

    Args:
        reached_at: the address the accepted socket was reached at (its local address, see
            ``connection.endpoint``); sent in the challenge for the client to check, and a
            hello that dialed elsewhere is refused. None: unknown (sans-IO tests).
        plain_ok: this side would go without the frame MAC (see the module docstring).
    """

    def __init__(self, *, reached_at: str | None = None, **options):
        super().__init__(**options)
        self.reached_at = reached_at

    def start(self) -> list[tuple]:
        return []

    def _receive(self, kind: Kind, payload) -> list[tuple]:
        if kind == Kind.REFUSE:
            self._refused(payload)
        if self._state == "waiting-hello" and kind == Kind.HELLO:
            self._hello = bytes(payload)
            hello = _json(self._hello)
            if hello.get("v") != PROTOCOL_VERSION:
                self._fail(_version_mismatch(hello.get("v")))
            if hello.get("cluster") != self.cluster_id:
                self._fail(f"cluster id {_shown(hello.get('cluster'))} is not this cluster's {self.cluster_id!r}")
            nonce = hello.get("nonce")
            info = hello.get("info")
            if not isinstance(nonce, str) or len(nonce) != 2 * _NONCE_BYTES or not isinstance(info, dict):
                self._fail("malformed hello: nonce or info missing")
            to, plain = hello.get("to"), hello.get("plain")
            if to is not None and not isinstance(to, str) or not isinstance(plain, bool):
                self._fail("malformed hello: `to` or `plain` missing")
            if to is not None and self.reached_at is not None and to not in (self.reached_at, self.info.get("address")):
                self._fail(f"the client dialed {_shown(to)} but reached this member at {self.reached_at}: something "
                           "in between relays the connection; not linking")
            self._pending_info = info
            self.frame_mac = not (plain and self.plain_ok)
            body = _encode({"v": PROTOCOL_VERSION, "nonce": self._urandom(_NONCE_BYTES).hex(), "info": self.info,
                            "at": self.reached_at, "mac": self.frame_mac})
            self._body = body
            self._state = "challenged"
            return [(Kind.CHALLENGE, _mac(self._key, b"grid-server", self._hello, body) + body)]
        if self._state == "challenged" and kind == Kind.PROOF:
            expected = _mac(self._key, b"grid-client", self._hello, self._body)
            if not hmac.compare_digest(bytes(payload), expected):
                self._fail("the client could not prove the cluster secret: the secrets differ")
            self.peer_info = self._pending_info
            self._finish(self._hello, self._body, client=False)
            return [(Kind.WELCOME, b"")]
        self._fail(f"unexpected {_kind_name(kind)} during the handshake (state {self._state})")


def server_context(tls) -> ssl.SSLContext | None:
    """The TLS context for accepted connections from a ``TlsConfig`` (None: no TLS).

    With ``ca`` set, peers must present a certificate signed by it (mutual TLS).
    """
    if tls is None or not tls.cert:
        return None
    context = _new_context(ssl.Purpose.CLIENT_AUTH, tls)
    _load_chain(context, tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE
    return context


def client_context(tls) -> ssl.SSLContext | None:
    """The TLS context for outgoing connections (None: no TLS).

    Members are addressed by IP, so the certificate chain is checked against
    ``ca`` but not the host name; the cluster secret still authenticates the peer.
    """
    if tls is None or not tls.cert:
        return None
    context = _new_context(ssl.Purpose.SERVER_AUTH, tls)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE
    _load_chain(context, tls)
    return context


def _new_context(purpose: ssl.Purpose, tls) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(purpose, cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; both named for the reader
        raise ConfigError(
            f"cannot load the CA certificate {tls.ca!r}: {exc}; point tls.ca at a readable PEM file "
            "of the CA that signs the members' certificates",
            key="tls.ca",
        ) from exc


def _load_chain(context: ssl.SSLContext, tls) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the certificate {tls.cert!r} / key {tls.key!r}: {exc}; point tls.cert and "
            "tls.key at a readable PEM certificate and its matching private key",
            key="tls.cert",
        ) from exc
