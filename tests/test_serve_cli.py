"""`geo serve`'s command line: loopback by default, a warning for any other address, the token from GEO_TOKEN,
the limits from one --config file whose mistakes are one-line errors naming the file and the key."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import geo.serve.app
from geo.cli import app
from geo.cli.serve import is_loopback
from geo.serve.limits import ServeLimits


@pytest.fixture
def started(monkeypatch):
    """What `geo serve` would hand to uvicorn and create_app, without serving."""
    seen: dict = {}
    real = geo.serve.app.create_app

    def create_app(index, limits, token=None):
        seen["limits"], seen["token"] = limits, token
        return real(index, limits, token)

    monkeypatch.setattr(geo.serve.app, "create_app", create_app)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw))
    return seen


def test_binds_loopback_by_default_and_warns_for_other_addresses(cli_bundle, started):
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1])], env={"GEO_TOKEN": ""})
    assert r.exit_code == 0, r.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8000 and "warning" not in r.output
    assert started["token"] is None and started["limits"] == ServeLimits()

    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--host", "0.0.0.0"], env={"GEO_TOKEN": ""})
    assert r.exit_code == 0 and started["host"] == "0.0.0.0"
    assert "warning: binding 0.0.0.0" in r.output and "anyone can" in r.output

    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--host", "0.0.0.0"],
                           env={"GEO_TOKEN": "from-env"})
    assert started["token"] == "from-env" and "anyone can" not in r.output


def test_limits_come_from_a_json_or_toml_config(cli_bundle, started, tmp_path):
    toml = tmp_path / "limits.toml"
    toml.write_text("max_batch = 32\nmax_upload_mb = 2.5\ntimeout_s = 10\n")
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--config", str(toml)])
    assert r.exit_code == 0, r.output
    assert started["limits"] == ServeLimits(max_batch=32, max_upload_mb=2.5, timeout_s=10)
    assert started["http"].header_timeout_s == ServeLimits().read_timeout_s  # slow-loris headers are cut too
    js = tmp_path / "limits.json"
    js.write_text(json.dumps({"queue_size": 128, "max_images": 32, "read_timeout_s": 7.5}))
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--config", str(js)])
    assert r.exit_code == 0 and started["limits"] == ServeLimits(queue_size=128, max_images=32, read_timeout_s=7.5)
    assert started["http"].header_timeout_s == 7.5
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--config", str(js), "--body-timeout-s", "2"])
    assert r.exit_code == 0 and started["limits"] == ServeLimits(queue_size=128, max_images=32, read_timeout_s=2)
    assert started["http"].header_timeout_s == 2  # the option wins over the file, for headers and bodies alike
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--body-timeout-s", "0"])
    assert r.exit_code == 2 and "--body-timeout-s" in r.output


@pytest.mark.parametrize("name,text,says", [
    ("typo.toml", "max-upload-mb = 5\n", ["'max-upload-mb'", "max_upload_mb"]),
    ("unknown.json", '{"colour": "blue"}', ["'colour'", "known keys"]),
    ("wrong.toml", 'max_batch = "16"\n', ["max_batch", "integer"]),
    ("float.json", '{"queue_size": 6.5}', ["queue_size", "integer"]),
    ("broken.toml", "max_batch = \n", ["not valid TOML"]),
    ("limits.yaml", "max_batch: 3\n", [".yaml"]),
    ("list.json", "[1, 2]", ["must hold a table of settings"]),
    ("conflict.json", '{"max_images": 100}', ["max_images", "queue_size"]),
    ("zero.toml", "timeout_s = 0\n", ["positive"]),
])
def test_bad_configs_are_one_line_errors_naming_the_file_and_key(cli_bundle, started, tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    r = CliRunner().invoke(app, ["serve", "--index", str(cli_bundle[1]), "--config", str(path)])
    assert r.exit_code == 2 and "error:" in r.output and "host" not in started
    assert name in r.output and all(s in r.output for s in says), r.output
    assert "Traceback" not in r.output


def test_a_bundle_that_is_not_one_is_a_one_line_error(started, tmp_path):
    r = CliRunner().invoke(app, ["serve", "--index", str(tmp_path)])
    assert r.exit_code == 2 and "error:" in r.output and "host" not in started


def test_serve_has_at_most_eight_options():
    import typer

    serve = typer.main.get_command(app).get_command(None, "serve")
    options = [p.opts[0] for p in serve.params if p.param_type_name == "option"]
    assert len(options) <= 8 and "--config" in options, options


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                       ("localhost", True), ("0.0.0.0", False), ("::", False),
                                       ("192.168.1.4", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop
