"""Pool members discovered from DNS (a headless Service's records), against a real DNS server on
127.0.0.1 (tests/upstreams/dns_server.py) whose records the tests change as kube-dns's change when
a Deployment scales: the lookups themselves, then a gateway following the records under load."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from serving.upstreams.config import PoolOptions, UpstreamSpec, parse_upstreams
from serving.upstreams.discovery import DiscoveryError, Resolver
from tests.deployment.gateway import Load, wait_for
from tests.upstreams.dns_server import DnsServer
from tests.upstreams.harness import run_gateway, serve_app, tgi_server

SRV = "_http._tcp.policy.feedloop.test"


@pytest.fixture
def dns_server():
    with DnsServer() as server:
        yield server


def lookup(server: DnsServer, spec: dict, timeout: float = 1.0) -> list[str]:
    options = PoolOptions(nameservers=[server.address], discovery_timeout=timeout)
    return asyncio.run(Resolver(options).urls(UpstreamSpec(**spec)))


def test_dns_discovery_turns_every_address_into_a_member_on_the_urls_port(dns_server):
    dns_server.set("policy.feedloop.test", "A", ["10.0.0.7", "10.0.0.5"])
    dns_server.set("policy.feedloop.test", "AAAA", ["fd00::5"])
    assert lookup(dns_server, {"url": "http://policy.feedloop.test:8080", "discovery": "dns"}) == [
        "http://10.0.0.5:8080", "http://10.0.0.7:8080", "http://[fd00::5]:8080"]
    # a name with no pods ready (no records of its own), or none at all: no members, not an error
    dns_server.set("policy.feedloop.test", "A", [])
    dns_server.set("policy.feedloop.test", "AAAA", [])
    assert lookup(dns_server, {"url": "http://policy.feedloop.test:8080", "discovery": "dns"}) == []
    assert lookup(dns_server, {"url": "http://ghost.feedloop.test:8080", "discovery": "dns"}) == []


def test_srv_discovery_takes_ports_from_the_records_and_only_the_lowest_priority(dns_server):
    dns_server.set(SRV, "SRV", ["0 50 8081 pod-a.feedloop.test.", "0 50 9090 pod-b.feedloop.test.",
                                "10 50 7070 backup.feedloop.test."])
    dns_server.set("pod-a.feedloop.test", "A", ["10.0.0.1"])
    dns_server.set("pod-b.feedloop.test", "A", ["10.0.0.2"])
    dns_server.set("backup.feedloop.test", "A", ["10.0.0.9"])
    assert lookup(dns_server, {"url": f"http://{SRV}", "discovery": "srv"}) == [
        "http://10.0.0.1:8081", "http://10.0.0.2:9090"]


def test_a_failing_lookup_is_an_error_not_an_empty_fleet(dns_server):
    dns_server.set("policy.feedloop.test", "A", ["10.0.0.5"])
    dns_server.mode = "servfail"
    with pytest.raises(DiscoveryError, match="policy.feedloop.test"):
        lookup(dns_server, {"url": "http://policy.feedloop.test:8080", "discovery": "dns"})
    dns_server.mode = "silent"
    with pytest.raises(DiscoveryError, match="Timeout|timed out"):
        lookup(dns_server, {"url": "http://policy.feedloop.test:8080", "discovery": "dns"}, timeout=0.3)


def test_discovery_specs_are_validated():
    with pytest.raises(ValueError, match="port from the SRV records"):
        parse_upstreams('{"policy": [{"url": "http://_http._tcp.policy:8080", "discovery": "srv"}]}')
    with pytest.raises(ValueError, match="SRV name"):
        parse_upstreams('{"policy": [{"url": "http://policy", "discovery": "srv"}]}')
    with pytest.raises(ValueError, match="discovery"):
        parse_upstreams('{"policy": [{"url": "http://policy:8080", "discovery": "consul"}]}')


def test_the_gateway_follows_the_records_as_the_fleet_scales_with_no_failed_request(dns_server, tiny_model_dir,
                                                                                   tmp_path):
    """Scale up (a pod's record appears: it joins after its health check), scale down under load (its
    record goes: it gets no new requests and finishes the ones it has), DNS failing (the members
    stay), every pod gone (a clear 503 naming the discovered name)."""
    with serve_app(tgi_server("alpha", delay=0.02)) as alpha, serve_app(tgi_server("beta", delay=0.02)) as beta:
        a_port, b_port = alpha.rsplit(":", 1)[1], beta.rsplit(":", 1)[1]
        dns_server.set("pod-a.feedloop.test", "A", ["127.0.0.1"])
        dns_server.set("pod-b.feedloop.test", "A", ["127.0.0.1"])
        dns_server.set(SRV, "SRV", [f"0 50 {a_port} pod-a.feedloop.test."])
        upstreams = {"policy": [{"url": f"http://{SRV}", "discovery": "srv", "kind": "tgi", "model_version": "v1"}],
                     "options": {"health_interval": 0.1, "discovery_interval": 0.1, "discovery_timeout": 0.3,
                                 "nameservers": [dns_server.address], "connect_timeout": 1, "request_timeout": 30}}
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
        with run_gateway(tmp_path, upstreams, tiny_model_dir) as gw, httpx.Client(timeout=30) as client:
            pool = gw.services.engine
            text = [client.post(f"{gw.url}/generate", json=body).json()["generated_text"] for _ in range(4)]
            assert {t.split()[0] for t in text} == {"alpha"}

            with Load(gw.url, workers=4, body=body) as load:
                # scale up: beta's record appears; it gets traffic once its health check passed
                dns_server.set(SRV, "SRV", [f"0 50 {a_port} pod-a.feedloop.test.",
                                            f"0 50 {b_port} pod-b.feedloop.test."])
                wait_for(lambda: any(m.url == beta and m.outcomes["ok"] >= 5 for m in pool.members), "beta serving")
                # scale down while requests run on alpha: they finish; new ones go to beta only
                wait_for(lambda: any(m.url == alpha and m.outstanding for m in pool.members), "alpha busy")
                dns_server.set(SRV, "SRV", [f"0 50 {b_port} pod-b.feedloop.test."])
                wait_for(lambda: [m.url for m in pool.members] == [beta], "alpha dropped")
                settled = sum(len(r) for r in load.results)
                wait_for(lambda: sum(len(r) for r in load.results) >= settled + 12, "traffic after alpha left")
                # DNS breaks: the pool keeps what it had and keeps serving
                dns_server.mode = "servfail"
                errors = pool.balancer.discovery_errors
                wait_for(lambda: pool.balancer.discovery_errors >= errors + 3, "failed lookups")
                assert [m.url for m in pool.members] == [beta]
                during_outage = sum(len(r) for r in load.results)
                wait_for(lambda: sum(len(r) for r in load.results) >= during_outage + 8, "traffic during the outage")
            results = [x for r in load.results for x in r]
            failed = [x for x in results if x[0] != 200]
            assert not failed, failed[:3]
            tail = [x[2] for r in load.results for x in r[-3:]]  # each load thread's last answers
            assert all('"generated_text":"beta' in t for t in tail), tail
            metrics = client.get(f"{gw.url}/metrics").text
            assert 'feedloop_upstream_members{pool="policy"} 1.0' in metrics
            assert 'feedloop_upstream_discovery_errors_total{pool="policy"}' in metrics

            # every pod gone: no members, and the error says where the gateway looked
            dns_server.mode = "answer"
            del dns_server.records[(SRV + ".", "SRV")]
            wait_for(lambda: not pool.members, "no members")
            r = client.post(f"{gw.url}/generate", json=body)
            assert r.status_code == 503, r.text
            assert SRV in r.json()["error"]
            assert client.get(f"{gw.url}/health").status_code == 503
