"""``tunnel kube`` (issue 18, Engineers): kubectl never prompts, and the kubeconfig is left tidy.

A real proxy and agent carry the device's "kube" service (a plain echo: no cluster is needed to
see that kubectl does not prompt — it fails with a TLS/connection error instead). Real kubectl
reads the kubeconfig ``tunnel kube`` wrote; SIGTERM and Ctrl-C must remove the fleet context
and give ``current-context`` back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import yaml
from fleet_harness import PY, EchoServer, Fleet

from tunnel.client import ClientError
from tunnel.engineer import kube_user

KUBECTL = shutil.which("kubectl")
PROD = {"apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "prod", "cluster": {"server": "https://prod.invalid"}}],
        "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod"}}],
        "users": [{"name": "prod", "user": {"token": "prod-token"}}], "current-context": "prod"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("kube"))
    f.echo = EchoServer()
    f.start_proxy()
    f.start_agent(f.enroll_device("dev-k", {"customer": "acme"}, {"kube": f"127.0.0.1:{f.echo.port}"},
                                  keepalive="5s"))
    f.ops = f.user("ops", ["admin"])
    f.wait_online(f.ops, "dev-k", timeout=20)
    creds = f.root / "creds"
    creds.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-subj", "/CN=engineer", "-days", "1", "-keyout", str(creds / "eng.key"),
                    "-out", str(creds / "eng.crt")], check=True, capture_output=True)
    (creds / "token").write_text("not-a-real-token\n")
    f.creds = creds
    yield f
    f.echo.close()
    f.close()


def env(world) -> dict:
    return {**os.environ, **world.env}


def kubeconfig(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(PROD, sort_keys=False))
    return path


def start_kube(world, path, *creds):
    proc = subprocess.Popen([PY, "-m", "tunnel.cli", "kube", "dev-k", "--kubeconfig", str(path), *creds,
                             "--identity", str(world.ops)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env(world))
    line = proc.stderr.readline()
    assert line.startswith("kubeconfig context fleet-dev-k -> 127.0.0.1:"), line + proc.stderr.read()
    return proc


def kubectl(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "--kubeconfig", str(path), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def test_kube_user_needs_a_credential_and_says_how(tmp_path):
    with pytest.raises(ClientError, match="--client-certificate FILE --client-key FILE.*--token-file"):
        kube_user(None, None, None)
    with pytest.raises(ClientError, match="go together"):
        kube_user(tmp_path / "c", None, None)
    with pytest.raises(ClientError, match="not a readable file"):
        kube_user(None, None, tmp_path / "missing")
    (tmp_path / "t").write_text("x")
    assert kube_user(None, None, tmp_path / "t") == {"tokenFile": str((tmp_path / "t").resolve())}


def test_without_a_credential_refuses_and_writes_nothing(world, tmp_path):
    path = kubeconfig(tmp_path)
    out = subprocess.run([PY, "-m", "tunnel.cli", "kube", "dev-k", "--kubeconfig", str(path),
                          "--identity", str(world.ops)], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, env=env(world))
    assert out.returncode == 1
    assert "would prompt for a username" in out.stderr and "--token-file" in out.stderr, out.stderr
    assert yaml.safe_load(path.read_text()) == PROD


def test_refused_device_writes_nothing(world, tmp_path):
    path = kubeconfig(tmp_path)
    out = subprocess.run([PY, "-m", "tunnel.cli", "kube", "nosuch", "--kubeconfig", str(path),
                          "--token-file", str(world.creds / "token"), "--identity", str(world.ops)],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env(world))
    assert out.returncode == 1 and "no device 'nosuch'" in out.stderr, out.stderr
    assert yaml.safe_load(path.read_text()) == PROD


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("how", ["certificate", "token"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_kubectl_does_not_prompt_and_the_context_goes_away(world, tmp_path, how, sig):
    path = kubeconfig(tmp_path)
    creds = (["--client-certificate", str(world.creds / "eng.crt"), "--client-key", str(world.creds / "eng.key")]
             if how == "certificate" else ["--token-file", str(world.creds / "token")])
    proc = start_kube(world, path, *creds)
    try:
        view = kubectl(path, "config", "view", "--minify", "-o", "yaml")
        assert view.returncode == 0, view.stderr
        minified = yaml.safe_load(view.stdout)
        assert minified["current-context"] == "fleet-dev-k"
        user = minified["users"][0]
        assert user["name"] == "fleet-dev-k"
        if how == "certificate":
            assert user["user"]["client-certificate"] == str(world.creds / "eng.crt")
            assert user["user"]["client-key"] == str(world.creds / "eng.key")
        else:
            assert user["user"]["tokenFile"] == str(world.creds / "token")
        # no secret copied into the kubeconfig: only paths
        assert "not-a-real-token" not in path.read_text() and "PRIVATE KEY" not in path.read_text()
        got = kubectl(path, "--request-timeout=5s", "get", "--raw", "/version")
        assert got.returncode != 0
        # the echo "API server" cannot speak TLS: kubectl fails on the connection, never asks
        assert any(w in got.stderr.lower() for w in ("tls", "connection", "eof", "http")), got.stderr
        assert "Username" not in got.stdout + got.stderr and "Password" not in got.stdout + got.stderr
    finally:
        proc.send_signal(sig)
        rest = proc.communicate(timeout=15)[1]
    assert "Traceback" not in rest, rest
    assert yaml.safe_load(path.read_text()) == PROD
    assert kubectl(path, "config", "current-context").stdout.strip() == "prod"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_a_context_switched_meanwhile_stays(world, tmp_path):
    path = kubeconfig(tmp_path)
    proc = start_kube(world, path, "--token-file", str(world.creds / "token"))
    try:
        assert kubectl(path, "config", "use-context", "prod").returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    config = yaml.safe_load(path.read_text())
    assert config["current-context"] == "prod"
    assert [c["name"] for c in config["contexts"]] == ["prod"]
