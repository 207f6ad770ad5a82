"""A real DNS server for the discovery tests: UDP on 127.0.0.1, answers built with dnspython from a
table the test edits while it runs (as kube-dns's answers change when a Deployment scales)."""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """`records[(name, "A" | "AAAA" | "SRV")] = ["127.0.0.1", …]` (SRV: "0 100 8080 target.").
    A name in no key answers NXDOMAIN; `mode = "servfail"` answers SERVFAIL, `"silent"` drops queries
    (the client times out)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.mode = "answer"
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> "DnsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def set(self, name: str, rdtype: str, values: list[str]) -> None:
        self.records[(_fqdn(name), rdtype)] = list(values)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.mode == "silent":
                continue
            query = dns.message.from_wire(data)
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        question = query.question[0]
        name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        if not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        values = self.records.get((name, rdtype), [])
        if values:  # a name with other types only: NOERROR, empty answer (NoAnswer)
            response.answer.append(dns.rrset.from_text_list(name, 5, "IN", rdtype, values))
        return response


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."
