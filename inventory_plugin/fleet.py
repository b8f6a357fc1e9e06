# fleet-tunnel Ansible inventory plugin (also shipped as the collection plugin fleet.tunnel.fleet).
"""Ansible inventory from the fleet-tunnel proxy: the devices the engineer may reach, by label.

Ansible loads this file as the inventory plugin ``fleet.tunnel.fleet`` (see
``ansible_collections/fleet/tunnel/plugins/inventory/fleet.py``, a link to this file); Python
code and tests import it as ``inventory_plugin.fleet``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from enroll.errors import FleetError

DOCUMENTATION = r"""
name: fleet
short_description: fleet-tunnel devices, grouped by label, reached through the tunnel
version_added: "0.1.0"
description:
  - Lists the devices the engineer's identity may reach (the proxy applies the engineer's roles),
    one host per device, named by its device id.
  - Groups every label as C(label_KEY_VALUE) (for example C(label_customer_acme)), plus
    C(fleet_online) and C(fleet_offline).
  - Sets the connection settings once, on the parent group (C(fleet) by default), so every task
    runs through the tunnel with nothing configured per device - C(ansible_ssh_common_args) is
    C(-F) the ssh_config written by C(tunnel config --hosts '*' --write) (ProxyCommand through
    the per-user helper, falling back to C(tunnel proxy-command %n %p), a per-login/device SSH
    certificate fetched on demand, and a known_hosts that trusts the fleet host CA).
  - The device listing is asked over the per-user helper's warm connection too (set
    C(FLEET_HELPER=off) to bypass it).
  - Configuration files must be named C(*.fleet.yml) or C(*.fleet.yaml).
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks this file as a fleet-tunnel inventory.
    required: true
    choices: ["fleet.tunnel.fleet", "fleet"]
  identity:
    description:
      - The engineer identity directory (C(tunnel login --identity DIR) or C(enroll user issue --dir DIR)).
      - Defaults to C($FLEET_IDENTITY), else C(~/.config/fleet-tunnel).
    type: path
    env:
      - name: FLEET_IDENTITY
  proxy:
    description:
      - The proxy as HOST:PORT for the listing. Defaults to the identity's C(client.yaml).
      - SSH sessions always go to the identity's proxy (the generated ssh_config).
    type: str
  selector:
    description:
      - Label selector(s), ANDed, as for C(tunnel ls) - C(customer=acme), C(site in (dal,hou)), C(!beta).
    type: list
    elements: str
    default: []
  online_only:
    description: Only devices whose agent is connected now.
    type: bool
    default: false
  label_groups:
    description: Make a group C(PREFIX_KEY_VALUE) for every label (on top of C(keyed_groups)).
    type: bool
    default: true
  label_group_prefix:
    description: Prefix of the label groups.
    type: str
    default: label
  parent_group:
    description:
      - Group that holds every device and the connection settings. Its C(_online) and
        C(_offline) children follow the name (C(fleet_online) for C(fleet), C(acme_online) for
        C(acme)), so two fleet inventories with different parent groups do not share them.
    type: str
    default: fleet
  login:
    description: Unix login on the devices (C(ansible_user) on the parent group); your role must hold it.
    type: str
  timeout:
    description: Seconds to wait for the proxy.
    type: float
    default: 20
"""

EXAMPLES = r"""
# acme.fleet.yml
plugin: fleet.tunnel.fleet
identity: ~/.config/fleet-tunnel
selector: ["customer=acme"]
login: root
keyed_groups:
  - key: fleet_labels.site | default('none')
    prefix: site
compose:
  firmware: fleet_labels.firmware | default('unknown')
# ansible-inventory -i acme.fleet.yml --graph
# ansible-playbook -i acme.fleet.yml playbooks/collect-logs.yml --limit label_site_dal
"""

NAME = "fleet.tunnel.fleet"
CONFIG_SUFFIXES = ("fleet.yml", "fleet.yaml")


class FleetInventoryError(FleetError, code="inventory"):
    """The listing could not be fetched; the message says what to do."""


def fetch_devices(identity_dir: str | None, proxy: str | None, timeout: float = 20.0) -> list[dict]:
    """The proxy's ``ls`` for this identity (already filtered by the engineer's roles).

    Asked over the per-user helper's warm connection (started on demand, as ssh starts it: the
    playbook's ssh connections then find it warm), so the listing costs no handshake of its
    own; directly, as before the helper, when none can be had (``FLEET_HELPER=off``, no runtime
    directory, a helper connected to another proxy than ``proxy``).
    """
    from tunnel import helper_client

    reply = helper_client.fetch(helper_client.identity_dir(identity_dir), "ls", proxy, timeout)
    if reply is None:
        body = _fetch_direct(identity_dir, proxy, timeout)
    elif not reply.get("ok"):
        raise FleetInventoryError(reply.get("reason") or "the proxy refused the device listing")
    else:
        body = reply["body"]
    devices = body.get("devices") if isinstance(body, dict) else None
    if not isinstance(devices, list):
        raise FleetInventoryError("the proxy's listing has no 'devices' list")
    return devices


def _fetch_direct(identity_dir: str | None, proxy: str | None, timeout: float) -> dict:
    """The listing on a connection of our own (no helper)."""
    import asyncio

    from tunnel.client import Client, ClientError, UserIdentity

    async def run():
        client = await Client.connect(identity, timeout=timeout)
        try:
            return await client.request("ls")
        finally:
            client.close()
            await asyncio.sleep(0.02)  # let the CONNECTION_CLOSE leave

    try:
        identity = UserIdentity.load(Path(identity_dir) if identity_dir else None, proxy)
        return asyncio.run(asyncio.wait_for(run(), timeout + 5))
    except ClientError as exc:
        raise FleetInventoryError(str(exc)) from None
    except TimeoutError:
        raise FleetInventoryError(
            f"the proxy did not answer the device listing within {timeout:g}s "
            "(is it running, and does the listing fit in one reply?)"
        ) from None
    except OSError as exc:
        raise FleetInventoryError(f"cannot read the identity: {exc}") from None


def ssh_common_args(identity_dir: str | None, proxy: str | None) -> str:
    """``-F`` the engineer's ssh_config for every host (written by tunnel.engineer)."""
    from tunnel.client import UserIdentity
    from tunnel.engineer import write_ssh_config

    identity = UserIdentity.load(Path(identity_dir) if identity_dir else None, proxy)
    return "-F " + shlex.quote(str(write_ssh_config(identity, "*")))


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = NAME

    def verify_file(self, path):
        return super().verify_file(path) and str(path).endswith(CONFIG_SUFFIXES)

    # --- helpers ------------------------------------------------------------------------------

    def _identity_dir(self) -> str | None:
        value = self.get_option("identity")
        return os.path.expanduser(value) if value else None

    def _cache_key(self, path: str) -> str:
        # the listing depends on who asks: never share a cached list between identities
        from tunnel.client import default_identity_dir

        who = f"{self._identity_dir() or default_identity_dir()}|{self.get_option('proxy') or ''}"
        return f"{self.get_cache_key(path)}_{hashlib.sha256(who.encode()).hexdigest()[:12]}"

    def _devices(self, path: str, cache: bool) -> list[dict]:
        key = self._cache_key(path)
        use_cache = self.get_option("cache")
        devices = None
        if use_cache and cache:
            try:
                devices = self._cache[key]
            except KeyError:
                devices = None
        if devices is None:
            try:
                devices = fetch_devices(self._identity_dir(), self.get_option("proxy"),
                                        float(self.get_option("timeout")))
            except FleetInventoryError as exc:
                raise AnsibleParserError(f"fleet inventory {path}: {exc}") from None
            if use_cache:
                self._cache[key] = devices
        return devices

    # --- parse --------------------------------------------------------------------------------

    def parse(self, inventory, loader, path, cache=True) -> None:
        super().parse(inventory, loader, path, cache)
        config = self._read_config_data(path) or {}
        unknown = sorted(set(config) - set(self.get_options()))
        if unknown:  # a typo must not silently widen the inventory
            raise AnsibleParserError(
                f"fleet inventory {path}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.get_options()))}"
            )
        from enroll.labels import LabelError, parse_selector

        try:
            selector = parse_selector(self.get_option("selector") or [])
        except LabelError as exc:
            raise AnsibleParserError(f"fleet inventory {path}: {exc}") from None
        try:
            common_args = ssh_common_args(self._identity_dir(), self.get_option("proxy"))
        except Exception as exc:  # ClientError (no identity), OSError
            raise AnsibleParserError(f"fleet inventory {path}: {exc}") from None

        devices = self._devices(path, cache)
        online_only = self.get_option("online_only")
        strict = self.get_option("strict")
        keyed = self.get_option("keyed_groups")
        prefix = self.get_option("label_group_prefix") if self.get_option("label_groups") else None
        label_groups: dict[str, str] = {}

        parent_name = self.get_option("parent_group")
        parent = self.inventory.add_group(parent_name)
        online_group = self.inventory.add_group(f"{parent_name}_online")
        offline_group = self.inventory.add_group(f"{parent_name}_offline")
        self.inventory.add_child(parent, online_group)
        self.inventory.add_child(parent, offline_group)
        self.inventory.set_variable(parent, "ansible_ssh_common_args", common_args)
        self.inventory.set_variable(parent, "fleet_identity", self._identity_dir() or "")
        if self.get_option("login"):
            self.inventory.set_variable(parent, "ansible_user", self.get_option("login"))

        for dev in sorted(devices, key=lambda d: d["id"]):
            labels = dict(dev.get("labels") or {})
            if not selector.matches(labels) or (online_only and not dev.get("online")):
                continue
            host = self.inventory.add_host(dev["id"], group=online_group if dev.get("online") else offline_group)
            hostvars = {
                "ansible_host": dev["id"],
                "fleet_labels": labels,
                "fleet_online": bool(dev.get("online")),
                "fleet_last_seen": dev.get("last_seen"),
                "fleet_lifecycle": dev.get("lifecycle") or labels.get("lifecycle", "active"),
                "fleet_locked": bool(dev.get("locked")),
            }
            for name, value in hostvars.items():
                self.inventory.set_variable(host, name, value)
            # compose/groups/keyed_groups see the host's name as in a play (not set as a host var)
            hostvars = {**hostvars, "inventory_hostname": host,
                        "inventory_hostname_short": host.split(".")[0]}
            self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, host, strict=strict)
            if prefix is not None:
                # what keyed_groups [{key: fleet_labels, prefix: label}] would make, without
                # templating each label (fast for 10,000 devices, and labels stay untrusted data)
                for key, value in labels.items():
                    raw = f"{prefix}_{key}_{value}" if prefix else f"{key}_{value}"
                    if raw not in label_groups:
                        label_groups[raw] = self.inventory.add_group(self._sanitize_group_name(raw))
                    self.inventory.add_child(label_groups[raw], host)
            self._add_host_to_keyed_groups(keyed, hostvars, host, strict=strict)
