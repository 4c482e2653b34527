"""Discovery strategies: static list, members file, registry folder, multicast (on 127.0.0.1), aws (moto)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import threading
import time

import pytest

from grid.cluster import multicast as multicast_module
from grid.cluster.config import Config
from grid.cluster.config_tables import AwsConfig, MembersPath, MulticastConfig
from grid.cluster.discovery import (
    AwsDiscovery,
    MembersFileDiscovery,
    RegistryFolderDiscovery,
    StaticDiscovery,
    make_discovery,
    parse_registry_entry_name,
    registry_entry_name,
)
from grid.cluster.multicast import MulticastDiscovery
from grid.errors import ConfigError, DiscoveryError

LOOPBACK = "127.0.0.1"
_poll_pause = threading.Event()  # never set: wait(t) is a short pause between polls


def wait_until(predicate, timeout: float = 5.0, message: str = "condition"):
    """Poll predicate until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        _poll_pause.wait(0.002)


def multicast_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "grid-multicast"]


@pytest.fixture(autouse=True)
def no_leaked_multicast_thread():
    yield
    assert multicast_threads() == [], "a test left a grid-multicast thread running"


# --- static list ------------------------------------------------------------------------------

def test_tcp_members_are_parsed_with_default_port_deduplicated_in_order():
    config = Config(join="tcp", members=["10.0.0.3", "10.0.0.8:5702", "10.0.0.3:5701", "[::1]:5703", "::2"],
                    join_timeout=1.5)
    found = make_discovery(config, secret=None)
    assert isinstance(found, StaticDiscovery)
    assert found.join_wait == 1.5
    expected = [("10.0.0.3", 5701), ("10.0.0.8", 5702), ("::1", 5703), ("::2", 5701)]
    assert found.candidates() == expected


def test_static_candidates_exclude_own_address():
    found = make_discovery(Config(join="tcp", members=["127.0.0.1:5701", "127.0.0.1:5702"]), secret=None)
    with found:
        found.start((LOOPBACK, 5702))
        assert found.candidates() == [(LOOPBACK, 5701)]


def test_tcp_without_members_is_a_lone_member():
    found = make_discovery(Config(join="tcp", members=None), secret=None)
    assert isinstance(found, StaticDiscovery)
    found.start((LOOPBACK, 5701))
    assert found.candidates() == []
    found.stop()
    found.stop()  # idempotent


# Config validates itself when built; these mutate a valid one to reach make_discovery's own checks.

@pytest.mark.parametrize("bad", ["10.0.0.1:99999", "10.0.0.1:", "host:port", "[::1", "a b"])
def test_bad_tcp_member_is_a_config_error_naming_the_key(bad):
    config = Config(join="tcp", members=["10.0.0.1"])
    config.members = [bad]
    with pytest.raises(ConfigError) as caught:
        make_discovery(config, secret=None)
    assert caught.value.key == "members"


def test_unknown_join_method_is_a_config_error():
    config = Config(join="tcp")
    config.join = "carrier-pigeon"
    with pytest.raises(ConfigError) as caught:
        make_discovery(config, secret=None)
    assert caught.value.key == "join"


def test_set_state_rejects_unknown_state():
    with pytest.raises(ValueError):
        make_discovery(Config(join="tcp"), secret=None).set_state("sleeping")


# --- members file -----------------------------------------------------------------------------

def test_members_file_is_created_with_parents_when_missing(tmp_path):
    path = tmp_path / "shared" / "deeper" / "members.txt"
    found = make_discovery(Config(join="tcp", members=MembersPath(str(path)), join_timeout=0.7), secret=None)
    assert isinstance(found, MembersFileDiscovery)
    assert found.join_wait == 0.7
    found.start((LOOPBACK, 5701))
    assert path.is_file() and path.read_text() == ""
    assert found.candidates() == []


def test_members_file_skips_comments_blank_and_bad_lines_and_is_reread(tmp_path, caplog):
    path = tmp_path / "members.txt"
    path.write_text("# the cluster\n\n10.0.0.3\n  10.0.0.8:5702  # second rack\nnot an address\n"
                    "10.0.0.9:70000\n127.0.0.1:5701\n10.0.0.3:5701\n")
    found = make_discovery(Config(join="multicast", members=MembersPath(str(path))), secret=None)
    found.start((LOOPBACK, 5701))
    with caplog.at_level(logging.WARNING, logger="grid.discovery"):
        assert found.candidates() == [("10.0.0.3", 5701), ("10.0.0.8", 5702)]
    assert "not an address" in caplog.text and "70000" in caplog.text
    path.write_text("10.0.0.4:5705\n")
    assert found.candidates() == [("10.0.0.4", 5705)]
    assert path.read_text() == "10.0.0.4:5705\n"  # start never clobbers an existing file


def test_members_file_that_vanished_gives_no_candidates(tmp_path):
    path = tmp_path / "members.txt"
    found = MembersFileDiscovery(str(path), join_wait=1.0)
    found.start((LOOPBACK, 5701))
    path.unlink()
    assert found.candidates() == []


# --- registry folder --------------------------------------------------------------------------

def registry(folder, *, register_on_join=True) -> RegistryFolderDiscovery:
    config = Config(join="tcp", members=MembersPath(str(folder)), register_on_join=register_on_join,
                    join_timeout=0.9)
    found = make_discovery(config, secret=None)
    assert isinstance(found, RegistryFolderDiscovery)
    return found


def test_path_ending_in_slash_is_a_registry_folder_created_on_start(tmp_path):
    folder = tmp_path / "registry"
    found = registry(str(folder) + "/")
    assert found.join_wait == 0.9
    assert not folder.exists()  # nothing happens before start
    found.start((LOOPBACK, 5701))
    assert folder.is_dir()
    assert sorted(os.listdir(folder)) == ["127.0.0.1"]
    found.stop()


def test_existing_directory_is_a_registry_folder_whatever_join_says(tmp_path):
    for join in ("multicast", "tcp", "aws"):
        config = Config(join=join, members=MembersPath(str(tmp_path)))
        assert isinstance(make_discovery(config, secret=None), RegistryFolderDiscovery)


def test_registry_entry_names_default_and_other_port_hold_the_host_name(tmp_path):
    first, second = registry(tmp_path), registry(tmp_path)
    first.start((LOOPBACK, 5701))
    second.start((LOOPBACK, 5702))
    assert sorted(os.listdir(tmp_path)) == ["127.0.0.1", "127.0.0.1_5702"]
    assert (tmp_path / "127.0.0.1").read_text().strip() == socket.gethostname()
    assert (tmp_path / "127.0.0.1_5702").read_text().strip() == socket.gethostname()
    assert first.candidates() == [(LOOPBACK, 5702)]
    assert second.candidates() == [(LOOPBACK, 5701)]
    first.stop()
    second.stop()


def test_registry_entry_written_only_when_register_on_join(tmp_path):
    found = registry(tmp_path, register_on_join=False)
    found.start((LOOPBACK, 5701))
    assert os.listdir(tmp_path) == []
    (tmp_path / "127.0.0.1").write_text("someone else's entry\n")
    found.stop(clean=True)
    assert os.listdir(tmp_path) == ["127.0.0.1"]  # not ours to remove


def test_clean_stop_removes_entry_unclean_stop_keeps_it(tmp_path):
    clean, crashed = registry(tmp_path), registry(tmp_path)
    clean.start((LOOPBACK, 5701))
    crashed.start((LOOPBACK, 5702))
    clean.stop(clean=True)
    crashed.stop(clean=False)
    assert os.listdir(tmp_path) == ["127.0.0.1_5702"]
    clean.stop()  # idempotent


def test_member_dead_prunes_its_entry_and_tolerates_a_missing_one(tmp_path):
    found = registry(tmp_path)
    found.start((LOOPBACK, 5701))
    (tmp_path / "127.0.0.2_5703").write_text("other\n")
    (tmp_path / "127.0.0.3").write_text("third\n")
    assert found.candidates() == [("127.0.0.2", 5703), ("127.0.0.3", 5701)]
    found.member_dead(("127.0.0.2", 5703))
    found.member_dead(("127.0.0.2", 5703))  # already gone: another member pruned it first
    found.member_dead((LOOPBACK, 5701))  # never prunes our own entry
    assert sorted(os.listdir(tmp_path)) == ["127.0.0.1", "127.0.0.3"]
    assert found.candidates() == [("127.0.0.3", 5701)]
    found.stop()


def test_registry_is_reread_on_every_call(tmp_path):
    found = registry(tmp_path)
    found.start((LOOPBACK, 5701))
    assert found.candidates() == []
    (tmp_path / "127.0.0.4_5710").write_text("late\n")
    assert found.candidates() == [("127.0.0.4", 5710)]
    (tmp_path / "127.0.0.4_5710").unlink()
    assert found.candidates() == []
    found.stop()


def test_registry_ignores_junk_temp_files_and_directories(tmp_path):
    for junk in ("README.txt", ".127.0.0.5.1234.abcd.tmp", "10.0.0.1_abc", "10.0.0.1_99999", "999.1.1.1",
                 "127.0.0.6_"):
        (tmp_path / junk).write_text("junk\n")
    (tmp_path / "127.0.0.9").mkdir()
    (tmp_path / "127.0.0.7_5701").write_text("explicit default port\n")
    found = registry(tmp_path, register_on_join=False)
    found.start((LOOPBACK, 5701))
    assert found.candidates() == [("127.0.0.7", 5701)]


def test_registry_entry_names_round_trip_including_ipv6():
    cases = {("10.0.0.1", 5701): "10.0.0.1", ("10.0.0.1", 5702): "10.0.0.1_5702",
             ("::1", 5701): "--1", ("fe80::1", 5702): "fe80--1_5702"}
    for address, name in cases.items():
        assert registry_entry_name(address) == name
        assert parse_registry_entry_name(name) == address
    assert parse_registry_entry_name("fe80--1%br-lan_5702") == ("fe80::1%br-lan", 5702)
    for junk in ("my-host", "a-b_5702", ".10.0.0.1.tmp"):
        with pytest.raises(ValueError):
            parse_registry_entry_name(junk)


def test_registry_refuses_to_register_an_unspecified_address(tmp_path):
    with pytest.raises(DiscoveryError, match="reachable IP address"):
        registry(tmp_path).start(("0.0.0.0", 5701))
    assert os.listdir(tmp_path) == []


def test_registry_entry_write_is_atomic_leaving_no_temp_file(tmp_path):
    found = registry(tmp_path)
    found.start((LOOPBACK, 5704))
    assert os.listdir(tmp_path) == ["127.0.0.1_5704"]
    found.stop(clean=False)


# --- multicast (127.0.0.1 only, one fresh group port per test) --------------------------------

@pytest.fixture
def group_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def multicast(group_port):
    """Factory of started MulticastDiscovery on 127.0.0.1; all stopped at teardown."""
    started = []

    def start(port=5701, *, cluster_id="test", secret="s3cret", trusted=(), **options):
        options.setdefault("joining_interval", 0.05)
        options.setdefault("member_interval", 0.2)
        settings = MulticastConfig(port=group_port, ttl=1, timeout_seconds=0.5, trusted_interfaces=list(trusted))
        found = MulticastDiscovery(settings, cluster_id=cluster_id, secret=secret, **options)
        started.append(found)
        found.start((LOOPBACK, port))
        return found

    yield start
    for found in started:
        found.stop()


def send_raw(group_port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        for datagram in datagrams:
            sender.sendto(datagram, ("224.2.2.3", group_port))


def signed(secret: str | None, **fields) -> bytes:
    fields["mac"] = multicast_module._sign(fields, multicast_module._announcement_key(secret))
    return json.dumps(fields).encode()


def test_make_discovery_multicast_uses_timeout_seconds_and_member_uuid():
    config = Config(join="multicast", multicast=MulticastConfig(timeout_seconds=1.25))
    found = make_discovery(config, secret="x", member_uuid="u-1")
    assert isinstance(found, MulticastDiscovery)
    assert (found.join_wait, found.member_uuid, found.cluster_id) == (1.25, "u-1", "dev")
    assert make_discovery(config, secret="x", cluster_id="other").cluster_id == "other"
    assert make_discovery(config, secret="x").member_uuid  # generated


def test_two_members_with_same_id_and_secret_hear_each_other(multicast):
    first = multicast(5701)
    second = multicast(5702)
    wait_until(lambda: first.candidates() == [(LOOPBACK, 5702)], message="first hears second")
    wait_until(lambda: second.candidates() == [(LOOPBACK, 5701)], message="second hears first")
    assert len(multicast_threads()) == 2


def test_a_member_answers_a_joiner_at_once(multicast, group_port):
    # Periodic announcements every minute: the joiner can only hear the member by its answer.
    # The member's one announcement at start is sent before the joiner exists.
    member = MulticastDiscovery(MulticastConfig(port=group_port, ttl=1), cluster_id="test", secret="s3cret",
                                joining_interval=60, member_interval=60)
    member.set_state("member")
    try:
        member.start((LOOPBACK, 5701))
        wait_until(lambda: member.datagrams_sent == 1, message="the member's first announcement")
        joiner = multicast(5702, joining_interval=60, member_interval=60)
        wait_until(lambda: joiner.candidates() == [(LOOPBACK, 5701)], message="the member's answer")
        assert member.candidates() == [(LOOPBACK, 5702)]
    finally:
        member.stop()


def test_members_are_listed_before_joiners(multicast):
    observer = multicast(5701)
    joiner = multicast(5702)
    member = multicast(5703)
    member.set_state("member")
    wait_until(lambda: len(observer.candidates()) == 2, message="both heard")
    assert joiner.member_uuid != member.member_uuid
    wait_until(lambda: observer.candidates() == [(LOOPBACK, 5703), (LOOPBACK, 5702)], message="member first")


def test_candidate_order_is_stable_first_heard_first(multicast):
    observer = multicast(5701)
    early = multicast(5702)
    wait_until(lambda: observer.candidates() == [(LOOPBACK, 5702)], message="early heard")
    multicast(5703)
    wait_until(lambda: len(observer.candidates()) == 2, message="late heard")
    accepted_before = observer.datagrams_accepted

    def order_holds_over_many_announcements():
        assert observer.candidates() == [(LOOPBACK, 5702), (LOOPBACK, 5703)]
        return observer.datagrams_accepted >= accepted_before + 8

    wait_until(order_holds_over_many_announcements, message="several more announcements")
    assert sorted(early.candidates()) == [(LOOPBACK, 5701), (LOOPBACK, 5703)]


@pytest.mark.parametrize("difference", [{"cluster_id": "other"}, {"secret": "wrong"}, {"secret": None}])
def test_other_cluster_id_or_secret_is_ignored(multicast, difference):
    ours = multicast(5701)
    theirs = multicast(5702, **difference)
    wait_until(lambda: ours.datagrams_ignored >= 2 and theirs.datagrams_ignored >= 2, message="rejections")
    assert ours.candidates() == [] and theirs.candidates() == []
    assert ours.datagrams_accepted == 0


def test_garbage_datagrams_are_ignored_and_the_listener_survives(multicast, group_port):
    listener = multicast(5701, joining_interval=60)
    good = dict(v=1, cluster="test", uuid="peer", address="127.0.0.1:5799", state="member", nonce="ab")
    garbage = [
        b"garbage \xff\xfe",
        pickle.dumps(("not", "unpickled")),
        b"[" * 1000,
        json.dumps(good).encode(),  # no mac
        json.dumps(dict(good, mac="00" * 32)).encode(),  # wrong mac
        signed("s3cret", **dict(good, v=2)),  # right mac, unknown version
        signed("s3cret", **dict(good, address="no:port:here:x[")),  # right mac, bad address
        signed("s3cret", **dict(good, nonce="x" * 1100)),  # over 1 KiB
        json.dumps([1, 2, 3]).encode(),
    ]
    send_raw(group_port, *garbage)
    wait_until(lambda: listener.datagrams_ignored >= len(garbage), message="all garbage ignored")
    assert listener.candidates() == []
    send_raw(group_port, signed("s3cret", **good))
    wait_until(lambda: listener.candidates() == [(LOOPBACK, 5799)], message="a valid announcement after garbage")


def test_secret_none_signs_with_an_empty_key(multicast, group_port):
    listener = multicast(5701, secret=None)
    send_raw(group_port, signed(None, v=1, cluster="test", uuid="p", address="127.0.0.1:5798",
                                state="joining", nonce="01"))
    wait_until(lambda: listener.candidates() == [(LOOPBACK, 5798)], message="unsigned-key announcement")


@pytest.mark.parametrize("trusted", [["127.0.0.1-9"], ["127.0.0.*"], ["10.0.0.1", "127.0.0.1"], ["127.0.0.0/8"]])
def test_trusted_interfaces_filter_the_source_address(multicast, trusted):
    strict = multicast(5701, trusted=["10.0.0.*", "127.0.0.2-9", "127.0.1.1"])
    trusting = multicast(5702, trusted=trusted)
    wait_until(lambda: trusting.candidates() == [(LOOPBACK, 5701)], message="trusting hears strict")
    wait_until(lambda: strict.datagrams_ignored >= 1, message="strict rejects 127.0.0.1")
    assert strict.candidates() == []


def test_candidates_expire_when_a_member_falls_silent(multicast):
    clock = FakeClock()
    observer = multicast(5701, clock=clock)
    leaver = multicast(5702, clock=clock)
    wait_until(lambda: observer.candidates() == [(LOOPBACK, 5702)], message="observer hears leaver")
    clock.advance(observer.heard_window - 0.5)
    assert observer.candidates() == [(LOOPBACK, 5702)]
    leaver.stop()

    def expired():
        clock.advance(observer.heard_window + 1)  # outruns any announcement still in flight
        return observer.candidates() == []

    wait_until(expired, message="the silent member expires")


def test_stop_joins_the_listener_thread_and_is_idempotent(multicast):
    found = multicast(5701)
    assert len(multicast_threads()) == 1
    found.stop()
    assert multicast_threads() == []
    found.stop()
    with pytest.raises(DiscoveryError):
        found.start((LOOPBACK, 5701))


def test_localhost_multicasts_on_the_loopback_interface():
    assert multicast_module._multicast_interface("localhost") == LOOPBACK
    assert multicast_module._multicast_interface("::1") == LOOPBACK
    assert multicast_module._multicast_interface("127.0.0.5") == "127.0.0.5"
    assert multicast_module._multicast_interface("0.0.0.0") == "0.0.0.0"


def test_context_manager_stops_the_listener(group_port):
    settings = MulticastConfig(port=group_port, ttl=1)
    with MulticastDiscovery(settings, cluster_id="test", secret=None) as found:
        found.start((LOOPBACK, 5701))
        assert len(multicast_threads()) == 1
    assert multicast_threads() == []


def test_non_multicast_strategies_ignore_state_and_deaths(tmp_path):
    found = make_discovery(Config(join="tcp", members=["127.0.0.1:5702"]), secret=None)
    found.start((LOOPBACK, 5701))
    found.set_state("member")
    found.member_dead((LOOPBACK, 5702))
    assert found.candidates() == [(LOOPBACK, 5702)]


def test_stop_before_start_is_harmless():
    MulticastDiscovery(MulticastConfig(), cluster_id="x", secret=None).stop()


def test_oversized_announcement_is_refused_at_start(group_port):
    found = MulticastDiscovery(MulticastConfig(port=group_port), cluster_id="x" * 2000, secret=None)
    with pytest.raises(DiscoveryError, match="cluster id"):
        found.start((LOOPBACK, 5701))


def test_bad_multicast_group_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        MulticastDiscovery(MulticastConfig(group="10.0.0.1"), cluster_id="x", secret=None)
    assert caught.value.key == "multicast.group"


# --- aws (moto: patched in-process, no network) -----------------------------------------------

@pytest.fixture
def fake_aws(monkeypatch):
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        yield boto3.client("ec2", region_name="us-east-1")


def run_instance(ec2, *, tags=None, security_groups=None) -> dict:
    options = {}
    if tags:
        options["TagSpecifications"] = [{"ResourceType": "instance",
                                         "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    if security_groups:
        options["SecurityGroups"] = security_groups
    return ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, **options)["Instances"][0]


def test_aws_finds_running_tagged_instances_only(fake_aws):
    tagged = [run_instance(fake_aws, tags={"grid": "dev"}) for _ in range(2)]
    run_instance(fake_aws)  # untagged
    run_instance(fake_aws, tags={"grid": "prod"})  # other tag value
    stopped = run_instance(fake_aws, tags={"grid": "dev"})
    fake_aws.stop_instances(InstanceIds=[stopped["InstanceId"]])
    config = Config(join="aws", port=5702, join_timeout=3.0,
                    aws=AwsConfig(region="us-east-1", tag_key="grid", tag_value="dev"))
    found = make_discovery(config, secret=None)
    assert isinstance(found, AwsDiscovery) and found.join_wait == 3.0
    found.start((tagged[0]["PrivateIpAddress"], 5702))
    assert found.candidates() == [(tagged[1]["PrivateIpAddress"], 5702)]
    found.start(("10.255.255.1", 5702))
    assert sorted(found.candidates()) == sorted((i["PrivateIpAddress"], 5702) for i in tagged)


def test_aws_security_group_filter_and_port_zero_means_default(fake_aws):
    fake_aws.create_security_group(GroupName="grid-sg", Description="grid members")
    inside = run_instance(fake_aws, security_groups=["grid-sg"])
    run_instance(fake_aws)
    config = Config(join="aws", port=0, aws=AwsConfig(region="us-east-1", security_group_name="grid-sg"))
    assert make_discovery(config, secret=None).candidates() == [(inside["PrivateIpAddress"], 5701)]


def test_aws_without_region_says_what_to_set(fake_aws, monkeypatch, tmp_path):
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    with pytest.raises(DiscoveryError, match="aws.region"):
        make_discovery(Config(join="aws"), secret=None).candidates()


def test_aws_without_boto3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(DiscoveryError, match=r"pip install 'hazelgrid\[aws\]'"):
        make_discovery(Config(join="aws"), secret=None)
