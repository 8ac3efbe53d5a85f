"""cm-server's settings: one model behind flags, ``CLUSTERMAP_*`` and a TOML file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clustermap.server.config import (
    CONFIG_ENV,
    ConfigError,
    ServerSettings,
    build_parser,
    load_settings,
)

CM_SERVER = str(Path(sys.executable).with_name("cm-server"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CLUSTERMAP_"):
            monkeypatch.delenv(name)


def test_every_default_lives_in_the_model_only() -> None:
    """The parser supplies nothing a flag did not say: an absent flag leaves the model's default."""
    args = vars(build_parser().parse_args([]))
    assert args == {}
    s, printing = load_settings([])
    assert not printing
    assert s.listen == "127.0.0.1:7700"
    assert s.heartbeat_ttl == 10.0
    assert s.max_reflection_streams == s.max_reflection == 2


def test_flags_win_over_environment_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.toml"
    config.write_text("heartbeat_ttl = 3\nmax_services = 7\ngrace = 1.5\n")
    monkeypatch.setenv("CLUSTERMAP_HEARTBEAT_TTL", "4")
    monkeypatch.setenv("CLUSTERMAP_MAX_SERVICES", "8")
    s, _ = load_settings(["--config", str(config), "--heartbeat-ttl", "5"])
    assert (s.heartbeat_ttl, s.max_services, s.grace) == (5.0, 8, 1.5)
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert ServerSettings().grace == 1.5


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--heartbeat-ttl", "0"], {}, "--heartbeat-ttl: Input should be greater than"),
        (["--heartbeat-ttl", "inf"], {}, "--heartbeat-ttl: Input should be a finite number"),
        (["--listen", "nonsense"], {}, "--listen: 'nonsense' is not HOST:PORT"),
        (["--store", "etcd://nohostport"], {}, "--store: 'nohostport' in"),
        (["--tls-cert", "x.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--max-workers", "0"], {}, "--max-workers: Input should be greater than or equal to 1"),
        ([], {"CLUSTERMAP_TOKEN": "  "}, "$CLUSTERMAP_TOKEN: is blank"),
        ([], {"CLUSTERMAP_MAX_WORKERS": "x"}, "--max-workers: Input should be a valid integer"),
        (["--etcd-user", "root"], {}, "need --store etcd://"),
        (
            ["--store", "etcd://127.0.0.1:2379", "--etcd-user", "root"],
            {},
            "--etcd-user and its password",
        ),
        (["--config", "/nonexistent/server.toml"], {}, "cannot read config file"),
    ],
)
def test_bad_settings_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], message: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        load_settings(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_secret_files_win_and_empty_ones_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLUSTERMAP_TOKEN", "from-env")
    assert load_settings([])[0].token == "from-env"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert load_settings(["--token-file", str(secret)])[0].token == "from-file"
    secret.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(["--token-file", str(secret)])
    with pytest.raises(ConfigError, match="cannot read --etcd-password-file"):
        load_settings(["--etcd-password-file", str(tmp_path / "missing")])


def test_print_config_shows_the_result_with_secrets_masked(tmp_path: Path) -> None:
    password = tmp_path / "etcd-password"
    password.write_text("hunter2")
    r = subprocess.run(
        [
            CM_SERVER,
            "--print-config",
            "--store",
            "etcd://127.0.0.1:2379/p",
            "--etcd-user",
            "root",
            "--etcd-password-file",
            str(password),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CLUSTERMAP_TOKEN": "s3cret", "CLUSTERMAP_GRACE": "2"},
    )
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["grace"] == 2.0
    assert shown["etcd_user"] == "root"
    assert shown["token"] == shown["etcd_password"] == "***"
    assert "s3cret" not in r.stdout
    assert "hunter2" not in r.stdout


def test_the_sidecars_client_certificate_is_not_the_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One environment for both commands (``cmctl up``): the sidecar's CLUSTERMAP_TLS_CERT/KEY
    (its client certificate) must not become the server's own certificate."""
    monkeypatch.setenv("CLUSTERMAP_TLS_CERT", "/etc/sidecar/client.pem")
    monkeypatch.setenv("CLUSTERMAP_TLS_KEY", "/etc/sidecar/client.key")
    s, _ = load_settings([])
    assert s.server_tls_cert is None
    assert s.server_tls_key is None
    monkeypatch.setenv("CLUSTERMAP_SERVER_TLS_CERT", "/etc/server/cert.pem")
    monkeypatch.setenv("CLUSTERMAP_SERVER_TLS_KEY", "/etc/server/key.pem")
    s, _ = load_settings([])
    assert (s.server_tls_cert, s.server_tls_key) == (
        Path("/etc/server/cert.pem"),
        Path("/etc/server/key.pem"),
    )
    s, _ = load_settings(["--tls-cert", "/a.pem", "--tls-key", "/a.key"])
    assert s.server_tls_cert == Path("/a.pem")
