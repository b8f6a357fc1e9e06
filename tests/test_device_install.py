"""The device install: the agent and `enroll device` must run without the server and controller
extras (no sqlite-utils, prometheus-client or ansible-core on a device)."""

import subprocess
import sys

BLOCK = (
    "import sys\n"
    "class Blocker:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('sqlite_utils', 'prometheus_client', 'ansible', 'jinja2'):\n"
    "            raise ImportError(f'{name} is not installed on a device')\n"
    "sys.meta_path.insert(0, Blocker())\n"
)


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=60)


def test_agent_and_device_enrollment_import_without_server_extras():
    out = run("import tunnel.agent, tunnel.agent_config, enroll.device, enroll.online; print('ok')")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_tunnel_agent_and_enroll_device_cli_start_without_server_extras(tmp_path):
    out = run("import sys; from tunnel.cli import main; sys.argv=['tunnel','agent','--config','/nonexistent.yaml']; "
              "raise SystemExit(main())")
    assert out.returncode == 1 and "no agent config at /nonexistent.yaml" in out.stderr, out.stderr
    out = run(f"import sys; from enroll.cli import main; raise SystemExit(main(['device','--dir',{str(tmp_path / 'd')!r},'--csr-only']))")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "d" / "request.json").exists()
