"""Admin routes and `feedloop models`: the token, bad bodies (4xx with messages, never 500), registry
refusals; and the checksum checks that decide whether a version may be served."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from serving.checkpoint import checksums, model_version_of, write_checkpoint
from serving.cli import main as feedloop
from serving.deployment import Refused, verify_files
from tests.deployment.gateway import run_gateway
from tests.http.server import fake_services, serve_http

TOKEN = "s3cret-token"


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]  # OpenAI's error body, like every /v1 route
    assert set(body) == {"message", "type", "param", "code"}
    return body["message"]


def test_admin_routes_need_the_token_and_refuse_bad_input_with_messages(tmp_path, base_dir, candidate_dir):
    with run_gateway(tmp_path, base_dir, admin_token=TOKEN) as gw, httpx.Client(timeout=30) as client:
        base, new = gw.services.engine.model_version, model_version_of(candidate_dir)
        url = f"{gw.url}/v1/admin"
        r = client.get(f"{url}/deployments")
        assert "Bearer" in _error(r, 401) and r.headers["www-authenticate"] == "Bearer"
        _error(client.get(f"{url}/models", headers={"Authorization": "Bearer wrong"}), 401)
        _error(client.post(f"{url}/models/{new}/promote", headers={"Authorization": TOKEN}), 401)  # no scheme
        auth = {"Authorization": f"Bearer {TOKEN}"}
        listed = client.get(f"{url}/models", headers=auth)
        assert listed.status_code == 200
        assert [(m["version"], m["role"], m["status"]) for m in listed.json()["data"]] == [(base, "policy", "serving")]
        # generation routes stay open
        assert client.post(f"{gw.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}
                           ).status_code == 200

        assert "register it first" in _error(client.post(f"{url}/models/{new}/promote", headers=auth), 404)
        gw.register(candidate_dir)
        assert "percent" in _error(client.post(f"{url}/models/{new}/canary", headers=auth, json={"percent": 0}), 422)
        assert "percent" in _error(client.post(f"{url}/models/{new}/canary", headers=auth, json={"percent": "x"}), 422)
        assert "required" in _error(client.post(f"{url}/models/{new}/canary", headers=auth, json={}), 422)
        assert "Unrecognized request argument supplied: force" in _error(client.post(f"{url}/models/{new}/promote", headers=auth,
                                                     json={"reason": "", "force": True}), 422)
        assert "JSON" in _error(client.post(f"{url}/models/{new}/promote", headers=auth, content=b"{oops",
                                            ), 422)
        assert "role" in _error(client.post(f"{url}/rollback", headers=auth, json={"role": "critic"}), 422)
        assert "status" in _error(client.get(f"{url}/models?status=bogus", headers=auth), 422)
        # changes the registry refuses: 409 with its reason
        assert "nothing to roll back to" in _error(client.post(f"{url}/rollback", headers=auth,
                                                               json={"role": "policy"}), 409)
        assert "already serves" in _error(client.post(f"{url}/models/{base}/canary", headers=auth,
                                                      json={"percent": 10}), 409)
        ok = client.post(f"{url}/models/{new}/canary", headers=auth, json={"percent": 10, "reason": "try it"})
        assert ok.status_code == 200 and ok.json()["deployment"]["canary_version"] == new
        assert client.post(f"{url}/rollback", headers=auth, json={"role": "policy", "reason": "no"}).status_code == 200
        assert "rejected" in _error(client.post(f"{url}/models/{new}/promote", headers=auth), 409)
        events = client.get(f"{url}/history?role=policy", headers=auth).json()["data"]
        assert [(e["action"], e["actor"]) for e in events] == [("rollback", "admin-api"), ("canary", "admin-api"),
                                                               ("deploy", "gateway")]


def test_admin_routes_without_a_registry_answer_404(tmp_path):
    with serve_http(fake_services(tmp_path)) as url, httpx.Client(timeout=10) as client:
        r = client.get(f"{url}/v1/admin/deployments")
        assert "without a model registry" in _error(r, 404) and r.json()["error"]["code"] == "no_model_registry"


def test_models_cli_lists_registers_and_exits_2_on_registry_errors(tmp_path, candidate_dir, capsys):
    db = ["--database-url", f"sqlite:///{tmp_path / 'feedloop.db'}"]
    assert feedloop(["models", "register", str(candidate_dir), "--json", *db]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert (registered["version"], registered["role"], registered["stage"], registered["status"]) == (
        model_version_of(candidate_dir), "policy", "base", "candidate")
    assert feedloop(["models", "promote", "nope", *db]) == 2
    assert "no model version nope" in capsys.readouterr().err
    assert feedloop(["models", "canary", registered["version"], "--percent", "0", *db]) == 2
    assert "(0, 100]" in capsys.readouterr().err
    assert feedloop(["models", "rollback", "--role", "policy", *db]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    assert feedloop(["models", "register", str(tmp_path), *db]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert feedloop(["models", "promote", registered["version"], "--reason", "first", *db]) == 0
    capsys.readouterr()
    assert feedloop(["models", "list", *db]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["VERSION", "ROLE", "STAGE", "STATUS", "TRAFFIC"]
    assert table[1].split()[:5] == [registered["version"], "policy", "base", "serving", "100%"]
    assert feedloop(["models", "list", "--json", *db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["deployments"]["policy"]["serving_version"] == registered["version"]


def test_pools_cli_registers_lists_and_removes_and_exits_2_with_the_reason(tmp_path, capsys):
    db = ["--database-url", f"sqlite:///{tmp_path / 'feedloop.db'}"]
    assert feedloop(["pools", "add", "tgi-v2", "--url", "http://tgi-v2:8080/", "--kind", "tgi", "--model-version",
                     "v2", "--discovery", "dns", "--json", *db]) == 0
    added = json.loads(capsys.readouterr().out)
    assert (added["name"], added["url"], added["discovery"], added["actor"]) == (
        "tgi-v2", "http://tgi-v2:8080", "dns", "cli")
    for argv, message in [
        (["add", "tgi-v3", "--url", "http://tgi:8080", "--kind", "tgi"], "a tgi pool needs model_version"),
        (["add", "tgi-v3", "--url", "http://_http._tcp.tgi:80", "--kind", "tgi", "--model-version", "v3",
          "--discovery", "srv"], "srv discovery takes the port from the SRV records"),
        (["add", "tgi-v2", "--url", "http://x:1", "--kind", "tgi", "--model-version", "v2"], "exists already"),
        (["remove", "tgi-v9"], "no pool tgi-v9 (registered: tgi-v2)"),
    ]:
        assert feedloop(["pools", *argv, *db]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"feedloop pools {argv[0]}: ") and message in err and "Value error" not in err, err
    assert feedloop(["pools", "list", "--json", *db]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["tgi-v2"]
    assert feedloop(["pools", "remove", "tgi-v2", "--reason", "drained", *db]) == 0
    assert "tgi-v2" in capsys.readouterr().out
    assert feedloop(["pools", "list", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_version_is_served_only_if_its_files_match_the_registry_and_the_manifest(tmp_path, candidate_dir):
    copy = shutil.copytree(candidate_dir, tmp_path / "copy")
    recorded = checksums(copy)
    verify_files(copy, recorded)  # intact: no exception
    with pytest.raises(Refused, match="recorded in the registry: model.safetensors"):
        verify_files(copy, {**recorded, "model.safetensors": "0" * 64})
    with pytest.raises(Refused, match="recorded in the registry: extra.bin"):  # a file added after registration
        (copy / "extra.bin").write_bytes(b"x")
        verify_files(copy, recorded)
    with pytest.raises(Refused, match="records no checksums"):
        verify_files(copy, {})
    with pytest.raises(Refused, match="does not exist"):
        verify_files(tmp_path / "missing", recorded)
    # a manifest that no longer matches its files is refused even when the registry's record does
    def save(tmp):
        shutil.copytree(candidate_dir, tmp, dirs_exist_ok=True)

    ckpt = write_checkpoint(tmp_path / "with-manifest", save, {"model_version": "m-1", "stage": "sft"})
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + " ")
    with pytest.raises(Refused, match="manifest: config.json"):
        verify_files(ckpt, checksums(ckpt))
