"""One error root (issue 16): the project's errors derive from ``FleetError``, keep the standard
base older ``except`` clauses rely on, and both CLIs exit with the status of the error's type
and code, never one read from its message."""

import argparse
import importlib

import pytest

from enroll import cli as enroll_cli
from enroll import clitools
from enroll.errors import (
    EXIT_CUT,
    EXIT_REFUSED,
    EXIT_RETIRED,
    EXIT_UNAVAILABLE,
    FleetError,
    RegistryError,
)
from tunnel import cli as tunnel_cli

#: (module, class, the standard base it keeps, its code; None: set per instance)
ERRORS = [
    ("enroll.users", "UserError", ValueError, "user"),
    ("enroll.users", "LoginError", ValueError, "login"),
    ("enroll.tokens", "TokenError", ValueError, "token"),
    ("enroll.backup", "BackupError", ValueError, "backup"),
    ("enroll.certs", "CertError", ValueError, "certificate"),
    ("enroll.state", "StateError", RuntimeError, "state"),
    ("enroll.admin", "AdminError", ValueError, "admin"),
    ("enroll.secret_input", "SecretError", ValueError, "secret"),
    ("enroll.request", "EnrollError", ValueError, "enrollment"),
    ("enroll.enrollment", "RenewalError", ValueError, None),
    ("enroll.audit", "ExportError", RuntimeError, "export"),
    ("enroll.roles", "RoleError", ValueError, "role"),
    ("enroll.device", "InstallError", ValueError, "install"),
    ("enroll.labels", "LabelError", ValueError, "label"),
    ("enroll.errors", "RegistryError", RuntimeError, "registry"),
    ("enroll.cli", "Refused", Exception, "refused"),
    ("tunnel.client", "ClientError", RuntimeError, None),
    ("tunnel.client", "Refusal", RuntimeError, None),
    ("tunnel.agent_config", "ConfigError", ValueError, "config"),
    ("tunnel.wire", "HeaderError", ValueError, None),
    ("tunnel.sshwire", "DecodeError", ValueError, "ssh_decode"),
    ("tunnel.admission", "Denied", Exception, None),
    ("tunnel.transport.policy", "CertificateRejected", Exception, "certificate_rejected"),
    ("tunnel.proxy_enroll", "_Tallied", ValueError, None),
]


@pytest.mark.parametrize(("module", "name", "base", "code"), ERRORS,
                         ids=[f"{m}.{n}" for m, n, *_ in ERRORS])
def test_every_error_sits_under_the_root(module, name, base, code):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, FleetError) and issubclass(cls, base)
    if code is not None:
        assert cls.code == code and cls.exit_status == EXIT_REFUSED


def test_inventory_error_sits_under_the_root():
    pytest.importorskip("ansible")
    from inventory_plugin.fleet import FleetInventoryError

    assert issubclass(FleetInventoryError, FleetError) and FleetInventoryError.code == "inventory"


def test_per_instance_codes_stay_the_callers():
    from enroll.enrollment import RenewalError
    from tunnel.admission import Denied
    from tunnel.client import ClientError
    from tunnel.wire import HeaderError

    assert RenewalError("renewal_limited", "too soon").code == "renewal_limited"
    assert Denied("locked", "maintenance").code == "locked"
    assert HeaderError("bad_header", "short").code == "bad_header"
    assert [ClientError("x", code).exit_status for code in ("unreachable", "cut", "forbidden")] == [
        EXIT_UNAVAILABLE, EXIT_CUT, EXIT_REFUSED]
    assert ClientError("x").code == "error"


def test_class_keywords_set_code_and_status():
    class Gone(FleetError, LookupError, code="gone", exit_status=EXIT_RETIRED):
        pass

    class Quiet(Gone):  # inherits both
        pass

    assert (Gone.code, Gone.exit_status, Quiet.code, Quiet.exit_status) == (
        "gone", EXIT_RETIRED, "gone", EXIT_RETIRED)
    assert (FleetError.code, FleetError.exit_status) == ("error", EXIT_REFUSED)
    with pytest.raises(LookupError):  # the standard base still catches it
        raise Quiet("x")


# --- both CLIs map the status from the type -------------------------------------------------


class _Retired(FleetError, code="retired", exit_status=EXIT_RETIRED):
    pass


def _raising(exc: BaseException):
    def build_parser(**_):
        parser = argparse.ArgumentParser(prog="x")
        parser.add_argument("--state")

        def run(args):
            raise exc

        parser.set_defaults(func=run)
        return parser

    return build_parser


def _client_error(message, code="error"):
    from tunnel.client import ClientError

    return ClientError(message, code)


def _transport_error():
    from tunnel.transport import TransportError

    return TransportError(reason="gone away")


# Each message says the opposite of what its type means: the status must follow the type.
CASES = [
    (lambda: _client_error("cannot connect to the proxy: the session was cut"), EXIT_REFUSED),
    (lambda: _client_error("all fine", "unreachable"), EXIT_UNAVAILABLE),
    (lambda: _client_error("cannot connect", "cut"), EXIT_CUT),
    (lambda: _Retired("cannot connect"), EXIT_RETIRED),
    (lambda: clitools.Refused("the proxy is unreachable"), EXIT_REFUSED),
    (lambda: RegistryError("cannot connect"), EXIT_REFUSED),
    (lambda: ValueError("cannot connect"), EXIT_REFUSED),
    (lambda: KeyboardInterrupt(), 130),
]


@pytest.mark.parametrize(("make", "status"), CASES)
@pytest.mark.parametrize("cli", [tunnel_cli, enroll_cli], ids=["tunnel", "enroll"])
def test_exit_status_follows_the_type_not_the_text(cli, make, status, monkeypatch, capsys):
    exc = make()
    monkeypatch.setattr(cli, "build_parser", _raising(exc))
    assert cli.main([]) == status
    err = capsys.readouterr().err
    if status != 130:
        assert err.count("\n") == 1 and err.endswith(f"error: {exc}\n") and "Traceback" not in err


def test_tunnel_transport_end_is_unavailable(monkeypatch, capsys):
    monkeypatch.setattr(tunnel_cli, "build_parser", _raising(_transport_error()))
    assert tunnel_cli.main([]) == EXIT_UNAVAILABLE
    assert "the connection to the proxy ended: gone away" in capsys.readouterr().err


def test_an_unexpected_error_is_not_swallowed(monkeypatch):
    # only typed errors become a status; a bug keeps its traceback
    for cli in (tunnel_cli, enroll_cli):
        monkeypatch.setattr(cli, "build_parser", _raising(KeyError("bug")))
        with pytest.raises(KeyError):
            cli.main([])


def test_no_exit_status_is_decided_from_message_text():
    import inspect

    for cli in (tunnel_cli, enroll_cli):
        source = inspect.getsource(cli)
        assert "in str(exc)" not in source and "_client_error" not in source
        assert "_NotRaised" not in source
