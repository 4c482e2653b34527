"""Tests of the config (grid.cluster.config, config_tables, config_check) and grid.net.address:
addresses, validation, files, lookup order, secrets, bind policy.

Every lookup test passes ``cwd``, ``home`` and ``environ`` explicitly (tmp_path and
plain dicts), so the real home folder and environment are never read or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from grid.cluster.config import Config, load_config
from grid.cluster.config_tables import AwsConfig, MembersPath, MulticastConfig, TlsConfig
from grid.net.address import DEFAULT_PORT, format_address, is_loopback, parse_address, trusted_interface_matches
from grid.errors import ConfigError, SecurityError

SOURCE = "/etc/test/grid.toml"


def config_error(data, source=SOURCE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, source)
    return info.value


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # secret files must be the owner's alone; the other files do not care
    return path


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.3", ("10.0.0.3", 5701)),
    ("10.0.0.8:5702", ("10.0.0.8", 5702)),
    ("host.example:80", ("host.example", 80)),
    ("localhost", ("localhost", 5701)),
    ("my_host-1.lan.:1", ("my_host-1.lan.", 1)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ("[::1]:5701", ("::1", 5701)),
    ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
    ("[::1]", ("::1", 5701)),
    ("::1", ("::1", 5701)),
    ("2001:db8::8", ("2001:db8::8", 5701)),
])
def test_parse_address_accepts_the_documented_forms(text, expected):
    assert parse_address(text) == expected


def test_parse_address_uses_the_given_default_port():
    assert parse_address("10.0.0.3", 6000) == ("10.0.0.3", 6000)
    assert parse_address("::1", 6000) == ("::1", 6000)
    assert parse_address("10.0.0.3:7", 6000) == ("10.0.0.3", 7)


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("10.0.0.3:x", "not a whole number"),
    ("10.0.0.3:-1", "not a whole number"),
    ("10.0.0.3:+1", "not a whole number"),
    ("10.0.0.3:65536", "out of range"),
    ("10.0.0.3:0", "port 0 cannot be connected to"),
    ("[::1]:0", "port 0 cannot be connected to"),
    ("10.0.0.3:", "port after ':' is missing"),
    (":5701", "host is missing"),
    ("10.0.0.3 :5701", "whitespace"),
    (" 10.0.0.3", "whitespace"),
    ("a:b:c", "not an IPv6 address"),
    ("[::1", "no closing"),
    ("[nothost]:5", "not an IPv6 address"),
    ("[::1]5701", "only ':port'"),
    ("[::1]:99999", "out of range"),
    ("10.0.0.300", "not a valid IPv4 address"),
    ("-bad.example", "not a valid host name"),
    ("bad..example", "not a valid host name"),
    ("h/x:5", "not a valid host name"),
])
def test_parse_address_rejects_bad_text_naming_key_and_source(text, why):
    with pytest.raises(ConfigError) as info:
        parse_address(text, key="required", source="grid.json")
    message = str(info.value)
    assert why in message
    assert "'required'" in message and "grid.json" in message
    assert info.value.key == "required" and info.value.source == "grid.json"
    assert "[IPv6]:port" in message  # says what is allowed


def test_parse_address_rejects_non_strings():
    with pytest.raises(ConfigError, match="expected an address string, got an integer"):
        parse_address(5701)


@pytest.mark.parametrize("address, text", [
    (("10.0.0.3", 5701), "10.0.0.3:5701"),
    (("host.example", 80), "host.example:80"),
    (("::1", 5701), "[::1]:5701"),
])
def test_format_address_round_trips_through_parse_address(address, text):
    assert format_address(address) == text
    assert parse_address(text) == address


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True), ("LocalHost.", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.3", False),
    ("myhost", False), ("128.0.0.1", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("pattern, address, matches", [
    ("10.0.0.3", "10.0.0.3", True),
    ("10.0.0.3", "10.0.0.4", False),
    ("10.0.0.0/8", "10.200.1.1", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("192.168.1.*", "192.168.1.77", True),
    ("192.168.1.*", "192.168.2.77", False),
    ("192.168.1.100-110", "192.168.1.105", True),
    ("192.168.1.100-110", "192.168.1.111", False),
    ("::1", "::1", True),
    ("192.168.1.*", "::1", False),
    ("192.168.1.*", "not-an-ip", False),
])
def test_trusted_interface_matches(pattern, address, matches):
    assert trusted_interface_matches(pattern, address) is matches


# ---------------------------------------------------------------- from_mapping: every key


EVERY_KEY = {
    "id": "prod",
    "join": "tcp",
    "members": ["10.0.0.3", "10.0.0.8:5702", "[::1]:5703"],
    "required": "10.0.0.3",
    "register_on_join": False,
    "port": 0,
    "interface": "0.0.0.0",
    "secret": "s3cret",
    "insecure": True,
    "multicast": {"group": "239.1.2.3", "port": 40000, "ttl": 0, "timeout_seconds": 0.5,
                  "trusted_interfaces": ["127.0.0.1", "10.0.0.0/8", "192.168.1.*"]},
    "aws": {"region": "eu-west-1", "tag_key": "cluster", "tag_value": "grid",
            "security_group_name": "grid-sg", "endpoint_url": "http://127.0.0.1:5000"},
    "tls": {"cert": "/certs/member.pem", "key": "/certs/member.key", "ca": "/certs/ca.pem"},
    "heartbeat_interval": 0.25,
    "failure_timeout": 3,
    "join_timeout": 1.5,
    "handshake_timeout": 2,
    "backup_count": 0,
    "partitions": 1,
    "workers": 3,
    "allow_code": False,
}


def test_from_mapping_reads_every_key():
    config = Config.from_mapping(EVERY_KEY, "every.toml")
    assert config.source == "every.toml"
    assert (config.id, config.join, config.required) == ("prod", "tcp", "10.0.0.3")
    assert config.members == ["10.0.0.3", "10.0.0.8:5702", "[::1]:5703"]
    assert (config.register_on_join, config.insecure, config.allow_code) == (False, True, False)
    assert (config.port, config.interface, config.secret) == (0, "0.0.0.0", "s3cret")
    assert config.multicast == MulticastConfig("239.1.2.3", 40000, 0, 0.5,
                                               ["127.0.0.1", "10.0.0.0/8", "192.168.1.*"])
    assert config.aws == AwsConfig("eu-west-1", "cluster", "grid", "grid-sg", "http://127.0.0.1:5000")
    assert config.tls == TlsConfig("/certs/member.pem", "/certs/member.key", "/certs/ca.pem")
    assert (config.heartbeat_interval, config.failure_timeout) == (0.25, 3.0)
    assert (config.join_timeout, config.handshake_timeout) == (1.5, 2.0)
    assert type(config.failure_timeout) is float and type(config.handshake_timeout) is float
    assert (config.backup_count, config.partitions, config.workers) == (0, 1, 3)


def test_defaults_are_valid_and_documented_values():
    config = Config()
    assert (config.id, config.join, config.port, config.source) == ("dev", "multicast", DEFAULT_PORT, "defaults")
    assert config.multicast == MulticastConfig("224.2.2.3", 54327, 32, 2.0, [])
    assert Config.from_mapping({}) == config


def test_to_mapping_round_trips_and_omits_none_and_source():
    config = Config.from_mapping(EVERY_KEY, "every.toml")
    mapping = config.to_mapping()
    assert "source" not in mapping
    assert Config.from_mapping(mapping) == config
    json.dumps(mapping)  # plain data, writable as JSON (and TOML)
    defaults = Config().to_mapping()
    assert "tls" not in defaults and "members" not in defaults and "workers" not in defaults
    assert defaults["aws"] == {}
    assert Config.from_mapping(defaults) == Config()


def test_to_mapping_is_a_copy():
    config = Config.from_mapping({"members": ["10.0.0.3"]})
    mapping = config.to_mapping()
    mapping["members"].append("10.0.0.4")
    mapping["multicast"]["trusted_interfaces"].append("10.0.0.9")
    assert config.members == ["10.0.0.3"] and config.multicast.trusted_interfaces == []


def test_repr_hides_the_secret():
    assert "s3cret" not in repr(Config(secret="s3cret"))


def test_equality_ignores_where_a_config_came_from():
    assert Config.from_mapping({"port": 6000}, "a.toml") == Config.from_mapping({"port": 6000}, "b.json")


# ---------------------------------------------------------------- members forms


def test_members_as_a_path_expands_the_home_folder():
    config = Config.from_mapping({"members": {"path": "~/registry"}})
    assert config.members == MembersPath(os.path.expanduser("~/registry"))
    assert Config.from_mapping(config.to_mapping()) == config


def test_members_path_shorthand():
    assert Config.from_mapping({"members_path": "/shared/registry/"}).members == MembersPath("/shared/registry/")


def test_members_as_a_comma_separated_string():
    assert Config.from_mapping({"members": "10.0.0.3, 10.0.0.8:5702,"}).members == ["10.0.0.3", "10.0.0.8:5702"]


@pytest.mark.parametrize("data", [
    {"members": {"path": "/shared/registry/", "addresses": ["10.0.0.3"]}},
    {"members": ["10.0.0.3"], "members_path": "/shared/registry/"},
])
def test_members_as_both_list_and_path_is_an_error(data):
    error = config_error(data)
    assert error.key == "members" and SOURCE in str(error)
    assert "not both" in str(error)


@pytest.mark.parametrize("data, key, fragment", [
    ({"members": {"addresses": ["10.0.0.3"]}}, "members", "takes only a path (found 'addresses')"),
    ({"members": {}}, "members", "takes only a path"),
    ({"members": {"path": ""}}, "members.path", "non-empty path"),
    ({"members": {"path": 3}}, "members.path", "non-empty path"),
    ({"members": 5}, "members", "expected a list of addresses or a table"),
    ({"members": ["10.0.0.3", "10.0.0.3:x"]}, "members", "'10.0.0.3:x' is not an address"),
    ({"members": [7]}, "members", "expected an address string"),
])
def test_bad_members(data, key, fragment):
    error = config_error(data)
    assert error.key == key and fragment in str(error) and SOURCE in str(error)


# ---------------------------------------------------------------- from_mapping: every error


@pytest.mark.parametrize("data, key, fragment", [
    # types
    ({"id": 5}, "id", "expected a string, got an integer 5"),
    ({"join": 1}, "join", "allowed: multicast, tcp, aws"),
    ({"port": "5701"}, "port", "expected an integer, got a string '5701'"),
    ({"port": True}, "port", "expected an integer, got a boolean"),
    ({"port": 5701.0}, "port", "expected an integer, got a number"),
    ({"port": None}, "port", "expected an integer, got nothing"),
    ({"register_on_join": 1}, "register_on_join", "expected true or false"),
    ({"insecure": "yes"}, "insecure", "expected true or false"),
    ({"allow_code": None}, "allow_code", "expected true or false"),
    ({"heartbeat_interval": "1"}, "heartbeat_interval", "expected a number of seconds"),
    ({"failure_timeout": True}, "failure_timeout", "expected a number of seconds"),
    ({"backup_count": 1.0}, "backup_count", "expected an integer"),
    ({"partitions": "271"}, "partitions", "expected an integer"),
    ({"workers": False}, "workers", "expected an integer"),
    ({"required": 3}, "required", "expected a string"),
    ({"interface": 0}, "interface", "expected a string"),
    ({"secret_file": ["a"]}, "secret_file", "expected a string"),
    ({"multicast": "224.2.2.3"}, "multicast", "expected a table"),
    ({"multicast": None}, "multicast", "expected a table"),
    ({"aws": ["eu-west-1"]}, "aws", "expected a table"),
    ({"tls": "cert.pem"}, "tls", "expected a table"),
    ({"multicast": {"group": 1}}, "multicast.group", "expected a string"),
    ({"multicast": {"ttl": 1.5}}, "multicast.ttl", "expected an integer"),
    ({"multicast": {"trusted_interfaces": "10.0.0.1"}}, "multicast.trusted_interfaces", "expected a list"),
    ({"multicast": {"trusted_interfaces": [1]}}, "multicast.trusted_interfaces", "expected a string"),
    ({"aws": {"region": 1}}, "aws.region", "expected a string"),
    ({"tls": {"cert": 1}}, "tls.cert", "expected a string"),
    # values
    ({"id": ""}, "id", "the cluster id is empty"),
    ({"id": "   "}, "id", "the cluster id is empty"),
    ({"id": "x" * 256}, "id", "at most 255"),
    ({"join": "multcast"}, "join", "did you mean 'multicast'?"),
    ({"join": "udp"}, "join", "allowed: multicast, tcp, aws"),
    ({"port": -1}, "port", "allowed: 0..65535 (0 lets the OS choose"),
    ({"port": 65536}, "port", "65536 is out of range"),
    ({"required": "10.0.0.3:x"}, "required", "not a whole number"),
    ({"interface": "1.2.3.4:80"}, "interface", "set the port with `port`"),
    ({"interface": "[::1]"}, "interface", "not an IP address or host name"),
    ({"interface": "bad host"}, "interface", "not an IP address or host name"),
    ({"secret": ""}, "secret", "empty"),
    ({"secret_file": ""}, "secret_file", "empty"),
    ({"secret": "a", "secret_file": "/run/secret"}, "secret", "both secret and secret_file"),
    ({"multicast": {"group": "10.0.0.1"}}, "multicast.group", "not an IPv4 multicast address"),
    ({"multicast": {"group": "240.0.0.1"}}, "multicast.group", "224.0.0.0 to 239.255.255.255"),
    ({"multicast": {"group": "ff02::1"}}, "multicast.group", "not an IPv4 multicast address"),
    ({"multicast": {"port": 0}}, "multicast.port", "allowed: 1..65535"),
    ({"multicast": {"port": 70000}}, "multicast.port", "allowed: 1..65535"),
    ({"multicast": {"ttl": 256}}, "multicast.ttl", "allowed: 0..255"),
    ({"multicast": {"ttl": -1}}, "multicast.ttl", "allowed: 0..255"),
    ({"multicast": {"timeout_seconds": 0}}, "multicast.timeout_seconds", "positive number of seconds"),
    ({"multicast": {"trusted_interfaces": ["10.0.0.256"]}}, "multicast.trusted_interfaces", "10.0.1.*"),
    ({"multicast": {"trusted_interfaces": ["10.0.0.9-3"]}}, "multicast.trusted_interfaces", "not allowed"),
    ({"multicast": {"trusted_interfaces": ["10.0.0.0/33"]}}, "multicast.trusted_interfaces", "not allowed"),
    ({"aws": {"region": ""}}, "aws.region", "empty"),
    ({"aws": {"tag_value": "grid"}}, "aws.tag_value", "without tag_key"),
    ({"aws": {"endpoint_url": "localhost:5000"}}, "aws.endpoint_url", "http:// or https://"),
    ({"tls": {"key": "member.key"}}, "tls.cert", "tls.key is set but tls.cert is missing"),
    ({"tls": {"key": "k", "ca": "c"}}, "tls.cert", "tls.key and tls.ca are set"),
    ({"tls": {}}, "tls.cert", "the [tls] table is empty"),
    ({"heartbeat_interval": 0}, "heartbeat_interval", "positive number of seconds"),
    ({"failure_timeout": -1}, "failure_timeout", "positive number of seconds"),
    ({"join_timeout": float("nan")}, "join_timeout", "positive number of seconds"),
    ({"handshake_timeout": float("inf")}, "handshake_timeout", "positive number of seconds"),
    ({"heartbeat_interval": 10}, "heartbeat_interval", "not shorter than failure_timeout (10.0 s)"),
    ({"heartbeat_interval": 2, "failure_timeout": 1}, "heartbeat_interval", "heartbeat_interval < failure_timeout"),
    ({"backup_count": -1}, "backup_count", "allowed: an integer from 0 to 6"),
    ({"backup_count": 7}, "backup_count", "out of range; allowed: an integer from 0 to 6"),
    ({"partitions": 0}, "partitions", "allowed: an integer >= 1"),
    ({"workers": 0}, "workers", "allowed: an integer >= 1"),
    ({"task_processes": -1}, "task_processes", "0 runs tasks in the member's threads"),
    ({"task_processes": "2"}, "task_processes", "expected an integer"),
    ({"max_frame_bytes": 100}, "max_frame_bytes", "from 4096 to"),
    ({"max_frame_bytes": 2**32}, "max_frame_bytes", "default 536870912, 512 MiB"),
    ({"max_frame_bytes": 1e6}, "max_frame_bytes", "expected an integer"),
])
def test_invalid_values_name_the_key_the_source_and_what_is_allowed(data, key, fragment):
    error = config_error(data)
    assert error.key == key and error.source == SOURCE
    message = str(error)
    assert f"config key {key!r}" in message and SOURCE in message
    assert fragment in message


def test_max_frame_bytes_defaults_to_the_wire_limit_and_can_be_set():
    from grid.net import wire

    assert Config().max_frame_bytes == wire.DEFAULT_MAX_PAYLOAD == 512 * 1024 * 1024
    assert Config.from_mapping({"max_frame_bytes": 65536}).max_frame_bytes == 65536


@pytest.mark.parametrize("data, key, fragment", [
    ({"prot": 1}, "prot", "did you mean 'port'? Allowed keys at the top level: id, join"),
    ({"hearbeat_interval": 1}, "hearbeat_interval", "did you mean 'heartbeat_interval'?"),
    ({"zzz": 1}, "zzz", "unknown key. Allowed keys at the top level"),
    ({"ttl": 1}, "ttl", "did you mean multicast.ttl"),
    ({"region": "x"}, "region", "did you mean aws.region"),
    ({"multicast.port": 1}, "multicast.port", "write it as a nested table"),
    ({"source": "x"}, "source", "unknown key"),
    ({"multicast": {"grup": "224.2.2.3"}}, "multicast.grup", "did you mean 'multicast.group'? Allowed keys in [multicast]"),
    ({"aws": {"regoin": "x"}}, "aws.regoin", "did you mean 'aws.region'?"),
    ({"tls": {"certificate": "x"}}, "tls.certificate", "did you mean 'tls.cert'?"),
    ({1: 2}, None, "setting names must be strings"),
])
def test_unknown_keys_suggest_the_closest_known_key(data, key, fragment):
    error = config_error(data)
    assert error.key == key and fragment in str(error) and SOURCE in str(error)


def test_a_wrong_typed_secret_is_not_echoed():
    message = str(config_error({"secret": 987654321}))
    assert "987654321" not in message and "expected a string, got an integer" in message


def test_from_mapping_rejects_a_non_table():
    with pytest.raises(ConfigError, match=r"in <dict>: expected a table of settings, got a list"):
        Config.from_mapping(["join", "tcp"])


def test_ints_are_accepted_for_float_fields_and_stored_as_floats():
    config = Config.from_mapping({"heartbeat_interval": 2, "failure_timeout": 20, "multicast": {"timeout_seconds": 3}})
    assert config.heartbeat_interval == 2.0 and type(config.heartbeat_interval) is float
    assert type(config.multicast.timeout_seconds) is float


# ---------------------------------------------------------------- direct construction, replace, validate


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"config key 'port' in Config\(\.\.\.\) arguments: .*0\.\.65535"):
        Config(port=-1)
    config = Config(multicast={"port": 5000}, members=("10.0.0.3",), tls={"cert": "c.pem"})
    assert config.multicast.port == 5000 and config.multicast.group == "224.2.2.3"
    assert config.members == ["10.0.0.3"] and config.tls == TlsConfig("c.pem")


def test_replace_returns_a_validated_copy():
    original = Config.from_mapping({"multicast": {"group": "239.1.1.1"}}, "grid.toml")
    changed = original.replace(port=0, multicast={"port": 40001}, members={"path": "/r"})
    assert (changed.port, changed.multicast.port, changed.multicast.group) == (0, 40001, "239.1.1.1")
    assert changed.members == MembersPath("/r") and changed.source == "grid.toml"
    assert (original.port, original.multicast.port, original.members) == (5701, 54327, None)
    assert original.replace(source="sim").source == "sim"
    changed.multicast.trusted_interfaces.append("127.0.0.1")
    assert original.multicast.trusted_interfaces == []  # no shared nested state


@pytest.mark.parametrize("changes, key, fragment", [
    ({"port": 70000}, "port", "out of range"),
    ({"prot": 1}, "prot", "did you mean 'port'?"),
    ({"multicast": {"gruop": "x"}}, "multicast.gruop", "did you mean 'multicast.group'?"),
    ({"multicast": {"group": "10.0.0.1"}}, "multicast.group", "multicast address"),
])
def test_replace_rejects_bad_changes(changes, key, fragment):
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({}, "grid.toml").replace(**changes)
    assert info.value.key == key and fragment in str(info.value)
    assert "Config.replace() of the config from grid.toml" in str(info.value)


def test_validate_catches_a_later_assignment():
    config = Config()
    config.partitions = 0
    with pytest.raises(ConfigError, match="'partitions'"):
        config.validate()


def test_effective_workers():
    assert Config(workers=3).effective_workers() == 3
    assert Config().effective_workers() >= 1


# ---------------------------------------------------------------- files


def test_from_file_reads_toml(tmp_path):
    path = write(tmp_path / "grid.toml", """
        id = "prod"
        join = "tcp"
        members = ["10.0.0.3", "10.0.0.8:5702"]
        port = 6000
        [multicast]
        ttl = 1
        [tls]
        cert = "member.pem"
    """.replace("\n        ", "\n"))
    config = Config.from_file(path)
    assert (config.id, config.join, config.port, config.multicast.ttl) == ("prod", "tcp", 6000, 1)
    assert config.members == ["10.0.0.3", "10.0.0.8:5702"]
    assert config.source == str(path)
    assert config.tls.cert == str(tmp_path / "member.pem")  # relative to the file's folder


def test_from_file_reads_json_and_resolves_relative_paths(tmp_path):
    path = write(tmp_path / "conf" / "grid.json", json.dumps({
        "join": "tcp", "members": {"path": "registry"}, "secret_file": "secret.txt",
        "tls": {"cert": "/abs/c.pem", "key": "k.pem"}}))
    config = Config.from_file(path)
    assert config.members == MembersPath(str(tmp_path / "conf" / "registry"))
    assert config.secret_file == str(tmp_path / "conf" / "secret.txt")
    assert (config.tls.cert, config.tls.key) == ("/abs/c.pem", str(tmp_path / "conf" / "k.pem"))


@pytest.mark.parametrize("text", ['join = "tcp"\n', '{"join": "tcp"}'])
def test_from_file_with_another_suffix_tries_toml_then_json(tmp_path, text):
    assert Config.from_file(write(tmp_path / "grid.conf", text)).join == "tcp"


@pytest.mark.parametrize("name, text, fragments", [
    ("grid.toml", 'id = "a"\nport = = 5\n', ["invalid TOML", "line 2"]),
    ("grid.json", '{\n  "port": 5701,\n}', ["invalid JSON at line 3", "column 1"]),
    ("grid.conf", "port: [", ["neither valid TOML", "nor valid JSON (line 1"]),
    ("grid.json", '["tcp"]', ["expected a table of settings, got a list"]),
    ("grid.toml", 'port = "x"\n', ["config key 'port'", "expected an integer"]),
])
def test_from_file_errors_name_the_file_and_line(tmp_path, name, text, fragments):
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(path) in str(info.value) and info.value.source == str(path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_file_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        Config.from_file(tmp_path)
    path = tmp_path / "latin1.toml"
    path.write_bytes('id = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        Config.from_file(path)


def test_a_round_trip_through_a_json_file(tmp_path):
    config = Config.from_mapping(EVERY_KEY)
    path = write(tmp_path / "grid.json", json.dumps(config.to_mapping()))
    assert Config.from_file(path) == config


# ---------------------------------------------------------------- lookup order


@pytest.fixture
def places(tmp_path):
    """A launch folder and a home folder, both empty, inside tmp_path."""
    cwd, home = tmp_path / "launch", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    return cwd, home


def lookup(places, environ=None, config=None):
    cwd, home = places
    return load_config(config, cwd=cwd, home=home, environ=environ or {})


def test_defaults_when_nothing_is_configured(places):
    config = lookup(places)
    assert config == Config() and config.source == "defaults"


def test_launch_folder_wins_over_home_and_grid(places):
    cwd, home = places
    write(cwd / "grid.toml", 'id = "from-cwd"\n')
    write(home / ".grid" / "grid.toml", 'id = "from-home"\n')
    config = lookup(places, {"GRID": "tcp"})
    assert config.id == "from-cwd" and config.source == str(cwd / "grid.toml")
    assert config.join == "multicast"  # first found wins: nothing merged from GRID


def test_home_wins_over_grid(places):
    _, home = places
    write(home / ".grid" / "grid.toml", 'id = "from-home"\n')
    config = lookup(places, {"GRID": "tcp"})
    assert config.id == "from-home" and config.join == "multicast"
    assert config.source == str(home / ".grid" / "grid.toml")


def test_explicit_argument_wins_over_everything(places):
    cwd, _ = places
    write(cwd / "grid.toml", 'id = "from-cwd"\n')
    given = Config(id="given")
    assert lookup(places, {"GRID": "tcp"}, given) is given
    from_dict = lookup(places, config={"id": "from-dict"})
    assert from_dict.id == "from-dict" and from_dict.source == "<dict>"


def test_explicit_path_argument(places, tmp_path):
    cwd, _ = places
    write(cwd / "conf" / "mine.json", '{"id": "mine"}')
    assert lookup(places, config="conf/mine.json").id == "mine"  # relative to cwd
    assert lookup(places, config=cwd / "conf" / "mine.json").id == "mine"
    with pytest.raises(ConfigError, match="does not exist"):
        lookup(places, config=tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"config argument: names the config file .*nope\.toml"):
        lookup(places, config="nope.toml")
    with pytest.raises(ConfigError, match="expected a Config, a dict or a path"):
        lookup(places, config=42)


def test_an_invalid_file_in_the_launch_folder_is_an_error_not_skipped(places):
    cwd, _ = places
    write(cwd / "grid.toml", "port = 99999\n")
    with pytest.raises(ConfigError, match=r"config key 'port' in .*grid\.toml"):
        lookup(places, {"GRID": "tcp"})


@pytest.mark.parametrize("method", ["multicast", "tcp", "aws", " AWS "])
def test_grid_variable_as_a_join_method(places, method):
    config = lookup(places, {"GRID": method})
    assert config.join == method.strip().lower()
    assert config.source == "GRID environment variable"
    assert config.replace(join="multicast") == Config()  # everything else is default


def test_grid_variable_as_a_path(places):
    cwd, home = places
    path = write(cwd / "elsewhere" / "cluster.toml", 'id = "by-path"\n')
    config = lookup(places, {"GRID": str(path)})
    assert config.id == "by-path"
    assert str(path) in config.source and "GRID environment variable" in config.source
    assert lookup(places, {"GRID": "elsewhere/cluster.toml"}).id == "by-path"
    write(home / "clusters" / "c.json", '{"id": "in-home"}')
    assert lookup(places, {"GRID": "~/clusters/c.json"}).id == "in-home"


def test_grid_variable_as_inline_json(places):
    config = lookup(places, {"GRID": '{"join": "tcp", "members": ["10.0.0.3"], "multicast": {"ttl": 4}}'})
    assert (config.join, config.members, config.multicast.ttl) == ("tcp", ["10.0.0.3"], 4)
    assert config.source == "GRID environment variable"
    relative = lookup(places, {"GRID": '{"members": {"path": "registry"}}'})
    assert relative.members == MembersPath(str(places[0] / "registry"))  # relative to the launch folder


@pytest.mark.parametrize("value, fragments", [
    ("garbage", ["'garbage' is not a join method, an existing config file or inline JSON",
                 "a join method (multicast, tcp or aws), a path to a config file", "inline JSON"]),
    ("tpc", ["did you mean 'tcp'?"]),
    ('{"join": "tcp",}', ["starts with '{' but is not valid JSON (column 16"]),
    ("/no/such/grid.toml", ["names the config file /no/such/grid.toml, which does not exist"]),
    ('{"join": "udp"}', ["config key 'join'", "allowed: multicast, tcp, aws"]),
    ('{"prot": 1}', ["did you mean 'port'?"]),
])
def test_grid_variable_errors_explain_the_accepted_forms(places, value, fragments):
    with pytest.raises(ConfigError) as info:
        lookup(places, {"GRID": value})
    assert "GRID environment variable" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_an_empty_grid_variable_means_unset(places):
    assert lookup(places, {"GRID": "  "}).source == "defaults"


# ---------------------------------------------------------------- secrets and bind policy


def test_resolved_secret_order(tmp_path):
    secret_file = write(tmp_path / "secret.txt", "  from-file\n")
    environ = {"GRID_SECRET": "from-env"}
    assert Config(secret="inline").resolved_secret(environ) == "inline"
    assert Config(secret_file=str(secret_file)).resolved_secret(environ) == "from-file"
    assert Config().resolved_secret(environ) == "from-env"
    assert Config().resolved_secret({}) is None
    assert Config().resolved_secret({"GRID_SECRET": ""}) is None


def test_a_secret_file_named_in_a_config_file_that_others_can_read_is_refused(tmp_path):
    """Only the --secret-file flag checked this; a config file's secret_file was read whatever its mode."""
    loose = write(tmp_path / "secret.txt", "s3cret\n")
    loose.chmod(0o644)
    config = Config.from_mapping({"secret_file": str(loose)}, "grid.toml")
    with pytest.raises(ConfigError, match=r"open to group or others \(mode 0644\).*chmod 600") as info:
        config.resolved_secret({})
    assert info.value.key == "secret_file" and "grid.toml" in str(info.value)
    assert config.resolved_secret({}, owner_only=False) == "s3cret"
    loose.chmod(0o600)
    assert config.resolved_secret({}) == "s3cret"


def test_resolved_secret_file_errors_name_the_key_and_source(tmp_path):
    missing = Config.from_mapping({"secret_file": str(tmp_path / "missing")}, "grid.toml")
    with pytest.raises(ConfigError) as info:
        missing.resolved_secret({})
    assert info.value.key == "secret_file" and "grid.toml" in str(info.value)
    assert "cannot read the secret file" in str(info.value)
    empty = Config(secret_file=str(write(tmp_path / "empty", "\n")))
    with pytest.raises(ConfigError, match="is empty"):
        empty.resolved_secret({})


@pytest.mark.parametrize("settings, environ, host", [
    ({}, {}, "127.0.0.1"),
    ({}, {"GRID_SECRET": "s"}, "0.0.0.0"),
    ({"secret": "s"}, {}, "0.0.0.0"),
    ({"interface": "127.0.0.5"}, {}, "127.0.0.5"),
    ({"interface": "::1"}, {}, "::1"),
    ({"interface": "localhost"}, {}, "localhost"),
    ({"interface": "10.0.0.3"}, {"GRID_SECRET": "s"}, "10.0.0.3"),
    ({"interface": "0.0.0.0", "secret": "s"}, {}, "0.0.0.0"),
    ({"interface": "0.0.0.0", "insecure": True}, {}, "0.0.0.0"),
])
def test_bind_host_policy(settings, environ, host):
    assert Config.from_mapping(settings).bind_host(environ) == host


@pytest.mark.parametrize("interface", ["0.0.0.0", "10.0.0.3", "::", "myhost.example"])
def test_bind_host_refuses_a_public_interface_without_a_secret(interface):
    config = Config.from_mapping({"interface": interface}, "grid.toml")
    with pytest.raises(SecurityError) as info:
        config.bind_host({})
    message = str(info.value)
    assert interface in message and "grid.toml" in message
    for remedy in ('secret = "..."', "GRID_SECRET", "secret_file", "insecure = true"):
        assert remedy in message


def test_bind_host_uses_the_secret_file(tmp_path):
    config = Config(interface="0.0.0.0", secret_file=str(write(tmp_path / "s", "x")))
    assert config.bind_host({}) == "0.0.0.0"
