"""`feedloop serve` as a user runs it: a separate process, HTTP and gRPC on 127.0.0.1, JSON logs,
a clean stop on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
from text_generation import Client

from protos.feedloop.v1 import common_pb2, serving_pb2, serving_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _feedloop(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "serving.cli", *args], env=env, **kw)


def test_serve_answers_over_http_and_grpc_then_stops_cleanly(tiny_model_dir, tmp_path):
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(tmp_path / "data"), "FEEDLOOP_MAX_BATCH_SIZE": "4"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = _feedloop("serve", "--model", str(tiny_model_dir), "--port", str(http_port),
                         "--grpc-port", str(grpc_port), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)

        info = httpx.get(f"{base}/info").json()
        assert info["model_version"].startswith("tiny-llama-")
        assert info["reward_model_trained"] is False
        assert info["max_batch_size"] == 4  # FEEDLOOP_MAX_BATCH_SIZE reached the engine

        answer = Client(base).generate("Hello there", max_new_tokens=5, decoder_input_details=False)
        assert answer.details.generated_tokens >= 1

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            params = common_pb2.SamplingParameters(max_new_tokens=5)
            outs = list(stub.Generate(serving_pb2.GenerateRequest(text="Hello there", parameters=params),
                                      timeout=30))
        assert outs[-1].generated_text == answer.generated_text  # greedy: same answer on both transports
        assert outs[-1].model_version == info["model_version"]

        metrics = httpx.get(f"{base}/metrics").text
        assert f'feedloop_requests_total{{model_version="{info["model_version"]}",outcome="ok"}} 2.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    serving = [e for e in lines if e["msg"] == "serving"]
    assert serving and serving[0]["http"] == f"http://127.0.0.1:{http_port}"
    assert serving[0]["grpc"] == f"127.0.0.1:{grpc_port}"


def test_info_prints_resolved_settings(tiny_model_dir, tmp_path):
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "serving.cli", "info", "--model", str(tiny_model_dir),
                          "--device", "cpu"], env=env, capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(out.stdout)
    assert info["data_dir"] == str(tmp_path)
    assert info["model"] == str(tiny_model_dir)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
