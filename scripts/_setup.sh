# Shared by scripts/test and scripts/demo: idempotent installation of what fleet-tunnel needs.

APT_PACKAGES=(iproute2 nftables conntrack openssh-server openssh-client postgresql socat autossh python3-venv)

setup_debian_packages() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "==> not root: skipping Debian packages (lab tests will skip)"
        return
    fi
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "==> apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Debian starts the distribution's own sshd and PostgreSQL; the lab runs its own.
        systemctl disable --now ssh postgresql >/dev/null 2>&1 || true
    fi
}

setup_venv() {
    local stamp=.venv/.fleet-tunnel-installed
    if [[ ! -x .venv/bin/python ]]; then
        echo "==> creating .venv"
        python3 -m venv .venv
    fi
    # Reinstall only when the dependency list changed (pyproject.toml: a new test tool such as mypy
    # in the test extra is installed on the next run).
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
        echo "==> pip install -e .[test]"
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e '.[test]'
        echo "$want" >"$stamp"
    fi
}
