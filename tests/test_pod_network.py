"""The pods-as-hosts machinery without Ray (seconds): namespaces, read-only volume, L4 balancer, load, cleanup.

Two "pods" each run a tiny HTTP server on their own :8000; the balancer must spread connections over both, drop a
pod whose probe fails, never retry a refused connection, and every namespace and link must be gone afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.pod_network import (
    PREFIX,
    Load,
    LoadBalancer,
    LoopThread,
    PodNetwork,
    kill_namespace,
    namespaces_supported,
    remove_leftovers,
)

SERVER = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"success")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        writable = os.access("/mnt/model", os.W_OK)
        body = ('{"model_version": "%s", "writable": %s}' % (sys.argv[1], str(writable).lower())).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def names() -> str:
    """This module's namespaces and links that exist now."""
    found = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return " ".join(word for word in found.split() if word.startswith(PREFIX))


@pytest.fixture
def two_pods(tmp_path: Path) -> Iterator[tuple[PodNetwork, LoadBalancer, LoopThread]]:
    reason = namespaces_supported()
    require(not reason, f"pods as hosts need network namespaces ({reason})", "sudo make test")
    network, loop, balancer = PodNetwork(), LoopThread(), LoadBalancer(probe_period_s=1.0)
    try:
        loop.run(balancer.start(), 10)
        for name in ("a", "b"):
            pod = network.add_pod(name)
            argv = network.command(
                pod, [sys.executable, "-c", SERVER, name], [(tmp_path, "/mnt/model", True)]
            )
            subprocess.Popen(argv, start_new_session=True)
            balancer.add(name, pod.address)
        deadline = time.monotonic() + 30
        while len(balancer.in_rotation()) < 2:
            assert time.monotonic() < deadline, "the pods' servers did not become Ready"
            time.sleep(0.2)
        yield network, balancer, loop
    finally:
        left = network.close()
        loop.run(balancer.stop(), 10)
        loop.close()
        assert not left and network.prefix not in names(), f"left behind: {left} {names()}"


@pytest.mark.timeout(120)
def test_balancer_spreads_drops_failed_pods_and_never_retries(two_pods: tuple) -> None:
    network, balancer, loop = two_pods
    load = Load(balancer.port, b"\x89PNG", clients=4)
    loop.run(load.start(), 10)
    time.sleep(1.5)
    report = loop.run(load.stop(), 30)
    assert report.failed == 0 and set(report.versions) == {"a", "b"}, report.line()
    assert min(report.versions.values()) > report.ok / 4, f"not round-robin: {report.versions}"

    # Pod b's server dies under load (its address stays): connections to it are refused until the probe notices,
    # and the balancer must pass each refusal on to the client, not retry on pod a.
    load = Load(balancer.port, b"\x89PNG", clients=4)
    loop.run(load.start(), 10)
    time.sleep(0.5)
    kill_namespace(network.pods["b"].namespace)
    time.sleep(2.5)
    report = loop.run(load.stop(), 30)
    refused = balancer.backends["b"].refused
    assert not balancer.backends["b"].ready
    assert refused > 0 and not report.non_2xx, (report.line(), refused)
    # each refusal reached a client; besides those only the requests in flight on b at the kill failed
    assert refused <= report.connection_errors <= refused + 4, (report.line(), refused)


@pytest.mark.timeout(60)
def test_volume_is_read_only_inside_the_pod(two_pods: tuple) -> None:
    _, balancer, loop = two_pods
    load = Load(balancer.port, b"\x89PNG", clients=1)
    status, body, _ = loop.run(load._one(), 10)
    assert status == 200 and b'"writable": false' in body, body


@pytest.mark.timeout(60)
def test_leftovers_of_a_crashed_run_are_removed() -> None:
    reason = namespaces_supported()
    require(not reason, f"pods as hosts need network namespaces ({reason})", "sudo make test")
    network = PodNetwork()
    pod = network.add_pod("x")
    proc = subprocess.Popen(network.command(pod, ["sleep", "600"], []), start_new_session=True)
    removed = remove_leftovers(network.prefix)  # as if the run had crashed before close()
    assert proc.wait(10) != 0
    assert f"{network.prefix}-x" in removed and network.prefix in removed, removed
    assert network.prefix not in names()
