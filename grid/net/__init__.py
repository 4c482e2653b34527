"""Bytes and sockets: frames (``wire``, sans-IO), the handshake and TLS (``security``), the only
socket code (``connection`` under the ``transport`` loop), typed messages (``messaging``),
pickling (``serialize``), addresses (``address``) and owner-only folders (``folders``).

Imports nothing of grid above ``errors``.
"""
