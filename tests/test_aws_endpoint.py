"""AWS discovery against a real EC2 API endpoint over HTTP: moto's server on loopback.

Members launched by the sim bind loopback addresses that instances registered with moto hold as
their private IPs, and find each other by tag and security group through boto3's real HTTP path,
with credentials from boto3's chain (a shared credentials file). A missing IAM permission and a
region with no instances each give what the member should say.
"""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

import grid
from grid.cluster.config import AwsConfig, Config
from grid.cluster.discovery import DiscoveryError, make_discovery
from sim import LocalCluster

from .conftest import wait_for

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

WAIT = 30
REGION = "us-east-1"
HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


@pytest.fixture
def endpoint(monkeypatch, tmp_path):
    """moto's EC2 endpoint on 127.0.0.1, credentials in a shared credentials file (boto3's chain)."""
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    reset = urllib.request.Request(f"{url}/moto-api/reset", method="POST")  # (moto's state is per process)
    urllib.request.urlopen(reset, timeout=10).close()
    try:
        yield url, boto3.client("ec2", endpoint_url=url, region_name=REGION)
    finally:
        urllib.request.urlopen(reset, timeout=10).close()
        server.stop()


def free_port() -> int:
    """A port free on every loopback address the members bind (bound on all of them to check)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            sockets = []
            for host in HOSTS:
                sockets.append(socket.socket())
                sockets[-1].bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for made in sockets:
                made.close()


def register(ec2, hosts, *, tag="sim", group="grid-sg"):
    """Instances whose private IPs are ``hosts``, tagged and in ``group``; the VPC made if needed."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["127.0.0.0/16"]}])["Vpcs"]
    vpc = vpcs[0]["VpcId"] if vpcs else ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    subnet = subnets[0]["SubnetId"] if subnets else ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [group]}])["SecurityGroups"]
    group_id = groups[0]["GroupId"] if groups else ec2.create_security_group(
        GroupName=group, Description="grid members", VpcId=vpc)["GroupId"]
    for host in hosts:
        ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet, PrivateIpAddress=host,
                          SecurityGroupIds=[group_id],
                          TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "grid", "Value": tag}]}])


def test_members_find_each_other_by_tag_and_group_through_the_endpoint(endpoint):
    url, ec2 = endpoint
    register(ec2, HOSTS)
    register(ec2, ["127.0.0.14"], tag="other")  # (another tag: not a candidate)
    port = free_port()
    aws = {"endpoint_url": url, "region": REGION, "tag_key": "grid", "tag_value": "sim",
           "security_group_name": "grid-sg"}
    cluster = LocalCluster(0, join="multicast", heartbeat_interval=0.2, failure_timeout=1.5)
    try:
        for host in HOSTS:
            cluster.add(join="aws", interface=host, port=port, aws=aws, join_timeout=2.0)
        client_config = dict(cluster.config(), join="tcp", members=[f"{host}:{port}" for host in HOSTS])
        with grid.connect(client_config) as client:
            wait_for(lambda: len(client.members()) == 3, WAIT, "the three members to find each other")
            assert sorted(m.address[0] for m in client.members()) == HOSTS
    finally:
        cluster.terminate()


def test_a_region_with_no_instances_has_no_candidates(endpoint):
    url, ec2 = endpoint
    register(ec2, HOSTS)
    config = Config(join="aws", aws=AwsConfig(endpoint_url=url, region="eu-west-1", tag_key="grid"))
    assert make_discovery(config, secret=None).candidates() == []
    found = make_discovery(Config(join="aws", port=5702, aws=AwsConfig(endpoint_url=url, region=REGION,
                                                                         tag_key="grid", tag_value="sim")), secret=None)
    assert sorted(found.candidates()) == [(host, 5702) for host in HOSTS]


def test_a_missing_iam_permission_is_a_clear_error(endpoint, monkeypatch):
    import moto.settings

    url, _ = endpoint
    iam = boto3.client("iam", endpoint_url=url, region_name=REGION)
    iam.create_user(UserName="no-ec2")
    key = iam.create_access_key(UserName="no-ec2")["AccessKey"]
    iam.put_user_policy(UserName="no-ec2", PolicyName="s3-only", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks IAM from now on
    config = Config(join="aws", aws=AwsConfig(endpoint_url=url, region=REGION))
    with pytest.raises(DiscoveryError, match="AccessDenied.*ec2:DescribeInstances"):
        make_discovery(config, secret=None).candidates()


def test_no_credentials_anywhere_in_the_chain_says_where_to_put_them(endpoint, monkeypatch, tmp_path):
    url, _ = endpoint
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    config = Config(join="aws", aws=AwsConfig(endpoint_url=url, region=REGION))
    with pytest.raises(DiscoveryError, match="no credentials found"):
        make_discovery(config, secret=None).candidates()
