"""deploy/nginx.conf and deploy/k8s.yaml: the settings a streaming LLM server needs behind a balancer, and (where
an nginx binary exists) two local servers behind nginx running that very configuration, its upstream list swapped
for the two servers' addresses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from nanovllm.serve.background import serve_model
from tests.serve.conftest import ROOT, free_port

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
K8S = ROOT / "deploy" / "k8s.yaml"


def parse_nginx(text: str) -> list:
    """nginx's syntax as nested lists: [name, args, children or None] per directive."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"#[^\n]*", "", text))
    pos = 0

    def block() -> list:
        nonlocal pos
        out = []
        while pos < len(tokens) and tokens[pos] != "}":
            words = []
            while tokens[pos] not in ("{", ";"):
                words.append(tokens[pos].strip("\"'"))
                pos += 1
            pos += 1
            if tokens[pos - 1] == "{":
                out.append([words[0], words[1:], block()])
                pos += 1  # the closing }
            else:
                out.append([words[0], words[1:], None])
        return out

    return block()


def find(directives: list, name: str, *args: str) -> list:
    return [d for d in directives if d[0] == name and list(d[1][:len(args)]) == list(args)]


def one(directives: list, name: str, *args: str):
    found = find(directives, name, *args)
    assert len(found) == 1, f"{name} {args}: {len(found)} found"
    return found[0]


def seconds(value: str) -> float:
    return float(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]] if value[-1].isalpha() else float(value)


def test_nginx_conf_balances_least_connections_and_streams():
    http = one(parse_nginx(NGINX_CONF.read_text()), "http")[2]
    upstream = one(http, "upstream", "nanovllm")[2]
    assert find(upstream, "least_conn")
    servers = find(upstream, "server")
    assert len(servers) >= 2 and all(any(a.startswith("max_fails=") for a in s[1]) for s in servers)
    server = one(http, "server")[2]
    assert one(server, "client_max_body_size")[1] == ["4m"]  # = server.max_body_bytes
    api = one(server, "location", "/")[2]
    settings = {d[0]: d[1] for d in api}
    assert settings["proxy_pass"] == ["http://nanovllm"] and settings["proxy_http_version"] == ["1.1"]
    assert settings["proxy_buffering"] == ["off"] and settings["proxy_cache"] == ["off"]
    assert seconds(settings["proxy_read_timeout"][0]) >= 600
    assert ["Connection", ""] in [d[1] for d in find(api, "proxy_set_header")]
    assert {"http_503", "error"} <= set(settings["proxy_next_upstream"])
    health = one(server, "location", "=", "/health")[2]
    assert {d[0]: d[1] for d in health}["proxy_pass"] == ["http://nanovllm"]


def test_k8s_manifest_one_gpu_a_pod_ready_on_health():
    docs = list(yaml.safe_load_all(K8S.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] > 30  # server.shutdown_grace_s plus time to close
    assert "nanovllm.serve" in container["args"] and "server.host=0.0.0.0" in container["args"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    port = container["ports"][0]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == port


def local_nginx_conf(ports: list[int], listen: int, prefix) -> str:
    """deploy/nginx.conf with its upstream servers and listen port swapped for local ones, and its state under
    `prefix` (no root needed)."""
    text = NGINX_CONF.read_text()
    text = re.sub(r"^(\s*)server 10\.0\.0\.\d+:\d+", lambda m: m.group(1) + "#", text, flags=re.M)
    upstream = "".join(f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;\n" for p in ports)
    text = text.replace("        keepalive 64;", upstream + "        keepalive 64;")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    head = (f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\ndaemon off;\n")
    temp = "".join(f"    {k}_temp_path {prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp + f"    access_log {prefix}/access.log;\n", 1)
    return head + text.replace("worker_processes auto;", "worker_processes 1;")


@pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx binary")
def test_two_servers_behind_nginx(tiny_model, tmp_path):
    engine = dict(device="cpu", max_model_len=256, num_kvcache_blocks=64, kvcache_block_size=16, max_num_seqs=8)
    with serve_model(tiny_model, "tiny", **engine) as a, serve_model(tiny_model, "tiny", **engine) as b:
        listen = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(local_nginx_conf([a.port, b.port], listen, tmp_path))
        nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{listen}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert nginx.poll() is None and time.monotonic() < deadline, nginx.stdout.read()
                time.sleep(0.1)
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(6):
                    assert c.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 2}).status_code == 200
                arrivals = []  # streamed through nginx event by event, not in one buffered piece
                body = {"prompt": "stream", "max_tokens": 12, "ignore_eos": True, "stream": True}
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())
                            json.loads(line[6:])
                assert len(arrivals) == 12 and arrivals[-1] - arrivals[0] > 0.005
                counts = []
                for s in (a, b):
                    text = httpx.get(s.url + "/metrics").text
                    counts.append(sum(float(line.split()[-1]) for line in text.splitlines()
                                      if line.startswith("nanovllm:request_success_total{")))
                assert all(n > 0 for n in counts) and sum(counts) == 7  # both servers served
        finally:
            nginx.terminate()
            nginx.communicate(timeout=30)
