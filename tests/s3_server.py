"""A real S3 API for tests and benchmarks: moto's standalone server, in a process of its own.

Not imported into the caller's process: moto's server brings flask, whose context proxies vLLM's
kernel dispatcher trips over when it walks the loaded modules (in-process engines then fail)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def start_s3_server(bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """(the server's process, the standard AWS_* variables a client needs), with `bucket` created."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10)  # CreateBucket
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    return server, {**env, "AWS_ENDPOINT_URL": endpoint}
