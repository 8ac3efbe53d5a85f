"""cm-server's settings: one model behind the command line, the environment and a TOML file.

Precedence: command-line flags, then ``CLUSTERMAP_*`` environment variables, then the file named by
``--config`` (or ``$CLUSTERMAP_SERVER_CONFIG``), then the defaults below. Each field is the one home
of its default, its check and its description; the flags (:func:`build_parser`),
``cm-server --print-config`` and ``docs/configuration.md`` (``scripts/gen-config-docs``) are all
derived from it. A field's flag is ``--`` plus its name with dashes unless it names another;
fields without a flag (secrets) come from the environment or the file only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from clustermap.config_sources import with_toml_file
from clustermap.defaults import DEFAULT_SERVER
from clustermap.model import parse_address
from clustermap.rules import MAX_META_BYTES

if TYPE_CHECKING:
    from clustermap.server.etcd_auth import EtcdCredentials

__all__ = [
    "CONFIG_ENV",
    "ConfigError",
    "ServerSettings",
    "build_parser",
    "describe_errors",
    "flag_of",
    "load_settings",
]

#: The variable naming the TOML file (the sidecar's is ``CLUSTERMAP_CONFIG``: they differ so that
#: both can run from one environment, as ``cmctl up`` does).
CONFIG_ENV = "CLUSTERMAP_SERVER_CONFIG"

#: Secrets: never printed in clear by ``--print-config``.
SECRETS = ("token", "subscribe_token", "etcd_password")


class ConfigError(Exception):
    """A bad command line or configuration file; the message is shown as is."""


def setting(
    default: Any,
    description: str,
    *,
    flag: str | None = "",
    metavar: str | None = None,
    **constraints: Any,
) -> Any:
    """A field with its command-line flag: ``""`` derives it from the name, ``None`` is none."""
    return Field(
        default,
        description=description,
        json_schema_extra={"flag": flag, "metavar": metavar},
        **constraints,
    )


class ServerSettings(BaseSettings):
    """Every setting of ``cm-server``."""

    model_config = SettingsConfigDict(
        env_prefix="CLUSTERMAP_",
        extra="forbid",
        validate_default=True,
        frozen=True,
        allow_inf_nan=False,
    )

    listen: str = setting(
        DEFAULT_SERVER,
        "address to serve gRPC on (port 0: any free port, logged)",
        metavar="HOST:PORT",
    )
    store: str = setting(
        "memory",
        "where the registry lives: `memory` (this process only) or "
        "`etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`",
        metavar="memory|etcd://HOST:PORT[,HOST:PORT...][/PREFIX]",
    )
    clusters: str | None = setting(
        None, "TOML file of static clusters, probed actively", metavar="FILE.toml"
    )
    heartbeat_ttl: float = setting(
        10.0, "lease of a registration that names none, seconds", ge=0.1, metavar="SECONDS"
    )
    warmup: float | None = setting(
        None,
        "answer polls NOT_READY this long after start, seconds (default: the heartbeat TTL; "
        "0 with etcd)",
        ge=0,
        metavar="SECONDS",
    )
    change_log_size: int = setting(
        10_000, "changes kept for deltas; an older subscriber gets a full map", ge=1, metavar="N"
    )
    self_preservation_threshold: float = setting(
        0.5,
        "stop expiring when more than this fraction of leased nodes would expire (1: off)",
        ge=0,
        le=1,
        metavar="FRACTION",
    )
    self_preservation_min_nodes: int = setting(
        3, "self-preservation applies from this many leased nodes", metavar="N"
    )
    token: str | None = setting(
        None, "admin bearer token (also allows Subscription/Inspection)", flag=None
    )
    token_file: Path | None = setting(
        None, "file holding the admin bearer token (wins over `token`)", metavar="PATH"
    )
    subscribe_token: str | None = setting(
        None, "bearer token for Subscription/Inspection only", flag=None
    )
    subscribe_token_file: Path | None = setting(
        None, "file holding the subscribe token (wins over `subscribe_token`)", metavar="PATH"
    )
    # named apart from the sidecar's tls_cert/tls_key (its client certificate), so that
    # CLUSTERMAP_TLS_CERT means one thing when both run from one environment
    server_tls_cert: Path | None = setting(
        None, "server certificate (enables TLS)", flag="--tls-cert", metavar="PEM"
    )
    server_tls_key: Path | None = setting(
        None, "server private key", flag="--tls-key", metavar="PEM"
    )
    tls_client_ca: Path | None = setting(
        None, "require client certificates signed by this CA (mutual TLS)", metavar="PEM"
    )
    max_workers: int = setting(
        8, "threads for blocking work: registry calls, encoding", ge=1, metavar="N"
    )
    max_watchers: int = setting(
        10_000,
        "concurrent Watch streams; one more is refused RESOURCE_EXHAUSTED",
        ge=0,
        metavar="N",
    )
    max_reflection_streams: int = setting(
        2, "concurrent reflection streams; 0: no reflection", ge=0, metavar="N"
    )
    max_services: int = setting(20_000, "services in the registry", ge=1, metavar="N")
    max_nodes_per_service: int = setting(5_000, "nodes in one service", ge=1, metavar="N")
    max_meta_bytes: int = setting(
        MAX_META_BYTES,
        f"meta of one node, keys plus values (at most {MAX_META_BYTES}: sidecars refuse more)",
        ge=0,
        le=MAX_META_BYTES,
        metavar="N",
    )
    watch_keepalive: float = setting(
        15.0, "seconds between keepalives on an idle Watch stream", ge=0, metavar="SECONDS"
    )
    max_recv_bytes: int = setting(1 << 20, "largest request, bytes", ge=1, metavar="N")
    max_send_bytes: int = setting(
        256 << 20, "largest answer (a full map), bytes", ge=1, metavar="N"
    )
    grace: float = setting(
        5.0, "on SIGTERM, seconds in-flight calls get to finish", ge=0, metavar="SECONDS"
    )
    metrics_listen: str | None = setting(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
        metavar="HOST:PORT",
    )  # fmt: skip
    etcd_ca: Path | None = setting(
        None, "etcd store: CA that signed etcd's certificate (enables TLS)", metavar="PEM"
    )
    etcd_cert: Path | None = setting(
        None, "etcd store: client certificate (etcd's `--client-cert-auth`; enables TLS)",
        metavar="PEM",
    )  # fmt: skip
    etcd_key: Path | None = setting(None, "etcd store: client private key", metavar="PEM")
    etcd_user: str | None = setting(None, "etcd store: user name (etcd auth)", metavar="NAME")
    etcd_password: str | None = setting(None, "etcd store: password of `etcd_user`", flag=None)
    etcd_password_file: Path | None = setting(
        None, "etcd store: file holding the password (wins over `etcd_password`)", metavar="PATH"
    )
    log_format: Literal["text", "json"] = setting("text", "log line format")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "least level logged")

    @property
    def max_reflection(self) -> int:
        return self.max_reflection_streams

    def etcd_credentials(self) -> EtcdCredentials:
        from clustermap.server.etcd_auth import EtcdCredentials

        return EtcdCredentials(
            ca=self.etcd_ca,
            cert=self.etcd_cert,
            key=self.etcd_key,
            user=self.etcd_user,
            password=self.etcd_password,
        )

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """A secret named by a file is read now; a named file that is empty is an error: it
        would otherwise switch authentication off without a word."""
        if not isinstance(data, dict):
            return data
        for name in ("token", "subscribe_token", "etcd_password"):
            path = data.get(f"{name}_file")
            if path is None:
                continue
            flag = flag_of(f"{name}_file")
            try:
                secret = Path(path).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise ValueError(f"cannot read {flag} {path}: {reason}") from None
            if not secret:
                raise ValueError(f"{flag} {path} is empty; write the secret in it")
            data = {**data, name: secret}
        return data

    @field_validator("token", "subscribe_token", "etcd_password")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and value and not value.strip():
            raise ValueError("is blank; unset it or put the secret in it")
        return value.strip() or None if value is not None else None

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_address(value, allow_zero=True)
            except ValueError:
                raise ValueError(f"{value!r} is not HOST:PORT") from None
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value != "memory":
            from clustermap.server.etcd_client import parse_etcd_url

            parse_etcd_url(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if bool(self.server_tls_cert) != bool(self.server_tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.server_tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert/--tls-key")
        etcd = ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password")
        if self.store == "memory" and any(getattr(self, n) for n in etcd):
            raise ValueError("the etcd settings (--etcd-*) need --store etcd://...")
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ValueError("--etcd-cert and --etcd-key go together")
        if bool(self.etcd_user) != bool(self.etcd_password):
            raise ValueError(
                "--etcd-user and its password ($CLUSTERMAP_ETCD_PASSWORD or "
                "--etcd-password-file) go together"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return with_toml_file(settings_cls, init_settings, env_settings, CONFIG_ENV)

    def shown(self) -> dict[str, Any]:
        """The settings as ``--print-config`` shows them: JSON values, secrets masked."""
        doc = self.model_dump(mode="json")
        for name in SECRETS:
            if doc.get(name):
                doc[name] = "***"
        return doc


def flag_of(name: str) -> str | None:
    """The command-line flag of field ``name`` (None: environment and file only)."""
    extra = ServerSettings.model_fields[name].json_schema_extra
    flag = extra.get("flag", "") if isinstance(extra, dict) else ""
    if flag is None:
        return None
    return str(flag) or "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Flags for every field that has one; an absent flag leaves the field to the other sources."""
    p = argparse.ArgumentParser(
        prog="cm-server",
        description="The ClusterMap server.",
        epilog="Every setting can also be given as CLUSTERMAP_<NAME> or in the --config TOML file "
        "(docs/configuration.md).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE.toml", help=f"settings file (${CONFIG_ENV})")
    for name, field in ServerSettings.model_fields.items():
        flag = flag_of(name)
        if flag is None:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default {default})"
        metavar = extra.get("metavar")
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        p.add_argument(
            flag,
            dest=name,
            choices=choices,
            metavar=str(metavar) if metavar else None,
            help=f"{field.description}{shown}; ${env_of(name)}".replace("%", "%%"),
        )
    p.add_argument(
        "--print-config", action="store_true", help="print the effective settings as JSON and exit"
    )
    return p


def env_of(name: str) -> str:
    return f"CLUSTERMAP_{name.upper()}"


def describe_errors(exc: ValidationError) -> str:
    """One line naming each bad setting by its flag (or variable), then what is wrong."""
    parts = []
    for e in exc.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        loc = e["loc"]
        if loc and isinstance(loc[0], str) and loc[0] in ServerSettings.model_fields:
            name = loc[0]
            parts.append(f"{flag_of(name) or '$' + env_of(name)}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts)


def load_settings(argv: Sequence[str] | None = None) -> tuple[ServerSettings, bool]:
    """Parse ``argv`` over the other sources; returns the settings and whether to print them.
    Raises :class:`ConfigError` with a one-line message."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    printing = bool(args.pop("print_config", False))
    if config is not None:
        os.environ[CONFIG_ENV] = config
    try:
        return ServerSettings(**args), printing
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    except ValueError as exc:  # a TOML file that does not parse
        raise ConfigError(str(exc)) from None
