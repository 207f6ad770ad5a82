"""Pool members found in DNS, so a pool follows a Deployment as it scales and rolls.

A Kubernetes headless Service (`clusterIP: None`) answers its name with one A/AAAA record per
*ready* pod, and `_<port>._tcp.<service>` with one SRV record per ready pod and named port. A
ClusterIP Service would hide the pods behind one virtual IP: the gateway could not balance by
outstanding requests, keep a breaker per pod, or reload the pods one at a time (a reload POSTed to
a Service URL lands on a random pod). So a spec with `discovery` stands for the members its name
resolves to, re-read every `discovery_interval` seconds:

- `"dns"`: `http://policy-worker.feedloop.svc:8080` → `http://<each A/AAAA address>:8080`;
- `"srv"`: `http://_http._tcp.policy-worker.feedloop.svc` → `http://<address of each target>:<its port>`
  (records of the lowest priority only, as RFC 2782 asks; the pool balances among them itself).

A name that does not exist (NXDOMAIN) or has no records means *no members* (a Deployment scaled
to zero, or no pod ready). A lookup that fails (timeout, SERVFAIL, no nameserver answering) raises
`DiscoveryError`: the pool keeps the members it has, since a DNS hiccup must not empty a fleet.
Answers are never cached here: polling is the point (CoreDNS's own TTL is 5 s).
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from serving.upstreams.config import PoolOptions, UpstreamSpec


class DiscoveryError(RuntimeError):
    """The lookup failed (not: the name has no members). Keep the members found before."""


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """`10.96.0.10`, `10.96.0.10:53`, `[fd00::10]:53`."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    return dns.nameserver.Do53Nameserver(host, port)


class Resolver:
    """dnspython's asyncio resolver: the system's (/etc/resolv.conf, as in a pod) or `nameservers`."""

    def __init__(self, options: PoolOptions) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not options.nameservers)
        if options.nameservers:
            self._resolver.nameservers = [_nameserver(n) for n in options.nameservers]
        self._resolver.lifetime = options.discovery_timeout
        self._resolver.cache = None

    async def _query(self, name: str, rdtype: str) -> list:
        try:
            return list(await self._resolver.resolve(name, rdtype, search=True))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL (NoNameservers), bad answers
            raise DiscoveryError(f"{rdtype} lookup of {name} failed: {type(exc).__name__}: {exc}") from None

    async def addresses(self, host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]  # already an address
        except ValueError:
            pass
        found = [r.address for r in await self._query(host, "A")]
        found += [r.address for r in await self._query(host, "AAAA")]
        return sorted(set(found))

    async def services(self, name: str) -> list[tuple[str, int]]:
        records = await self._query(name, "SRV")
        if not records:
            return []
        best = min(r.priority for r in records)
        out: set[tuple[str, int]] = set()
        for r in records:
            if r.priority == best and str(r.target) != ".":  # "." : the service is decidedly not there
                out.update((a, r.port) for a in await self.addresses(str(r.target)))
        return sorted(out)

    async def urls(self, spec: UpstreamSpec) -> list[str]:
        """The base URLs of `spec`'s members, sorted."""
        parts = urlsplit(spec.url)
        if spec.discovery == "srv":
            found = await self.services(parts.hostname)
        else:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            found = [(a, port) for a in await self.addresses(parts.hostname)]
        return sorted(urlunsplit((parts.scheme, _netloc(a, p), parts.path, "", "")) for a, p in found)


def _netloc(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


__all__ = ["DiscoveryError", "Resolver"]
