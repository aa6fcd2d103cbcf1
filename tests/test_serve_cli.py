"""`geo serve`'s command line: loopback by default, a warning for any other address, the token from GEO_TOKEN."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import geo.serve.app
from geo.cli import app
from geo.cli.serve import is_loopback


@pytest.fixture
def started(monkeypatch):
    """What `geo serve` would hand to uvicorn and create_app, without serving."""
    seen: dict = {}
    real = geo.serve.app.create_app

    def create_app(index, settings):
        seen["settings"] = settings
        return real(index, settings)

    monkeypatch.setattr(geo.serve.app, "create_app", create_app)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw))
    return seen


def test_binds_loopback_by_default_and_warns_for_other_addresses(cli_bundle, started):
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1])], env={"GEO_TOKEN": ""})
    assert r.exit_code == 0, r.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8000 and "warning" not in r.output
    assert started["settings"].token is None

    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--host", "0.0.0.0"], env={"GEO_TOKEN": ""})
    assert r.exit_code == 0 and started["host"] == "0.0.0.0"
    assert "warning: binding 0.0.0.0" in r.output and "anyone can" in r.output

    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--host", "0.0.0.0"],
                           env={"GEO_TOKEN": "from-env"})
    assert started["settings"].token == "from-env" and "anyone can" not in r.output


def test_bad_limits_and_bundles_are_one_line_errors(cli_bundle, started, tmp_path):
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--max-images", "100"])
    assert r.exit_code == 2 and "--queue-size" in r.output
    r = CliRunner().invoke(app, ["serve", "--index", str(tmp_path)])
    assert r.exit_code == 2 and "error:" in r.output and "host" not in started


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                       ("localhost", True), ("0.0.0.0", False), ("::", False),
                                       ("192.168.1.4", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop
