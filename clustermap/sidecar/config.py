"""The sidecar's settings: one model behind the command line, the environment and a TOML file.

Precedence: command-line flags, then ``CLUSTERMAP_*`` environment variables, then the file named by
``--config`` (or ``$CLUSTERMAP_CONFIG``), then the defaults below. ``cm-sidecar --print-config``
prints the result, and ``docs/configuration.md`` is generated from this model
(``scripts/gen-config-docs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from clustermap.config_sources import with_toml_file
from clustermap.defaults import DEFAULT_REGION, DEFAULT_SERVER
from clustermap.feedback.layout import MAX_EJECTION_S, MAX_ENTRIES, MAX_IDS, MAX_ROWS
from clustermap.model import parse_address
from clustermap.rules import MAX_SLOW_START_S, check_zone

__all__ = ["DEFAULT_SERVER", "SidecarSettings"]


class SidecarSettings(BaseSettings):
    """Every setting of ``cm-sidecar``."""

    model_config = SettingsConfigDict(
        env_prefix="CLUSTERMAP_", extra="forbid", validate_default=True, frozen=True
    )

    server: Annotated[list[str], NoDecode] = Field(
        default=[DEFAULT_SERVER],
        description="cm-server addresses in failover order (env: comma-separated)",
    )
    region: Path = Field(default=Path(DEFAULT_REGION), description="the region file to publish")
    interval: float = Field(default=0.5, gt=0, le=3600, description="seconds between polls")
    jitter: float = Field(
        default=0.1, ge=0, lt=1, description="each interval varies randomly by this fraction"
    )
    watch: bool = Field(
        default=False,
        description="hold a Watch stream instead of polling; poll every `interval` while it is "
        "down",
    )
    watch_silence: float = Field(
        default=35.0,
        gt=0,
        description="watch: seconds without an answer before the stream counts as dead "
        "(cm-server sends a keepalive every 15 s)",
    )
    timeout: float = Field(default=2.0, gt=0, description="deadline of one poll, seconds")
    zone: str | None = Field(
        default=None,
        description="this machine's zone: picks stay among nodes whose meta zone is it while "
        "enough of them are healthy (docs/routing.md)",
    )
    services: Annotated[list[str], NoDecode] = Field(
        default=[], description="subscribe to these services only (default: all)"
    )
    snapshot: Path | None = Field(
        default=None, description="file keeping the last good map for a warm start"
    )
    snapshot_every: float = Field(
        default=5.0, ge=0, description="write the snapshot at most this often, seconds"
    )
    protect: bool = Field(default=True, description="hold back updates that would wipe the map")
    protect_max_drop: float = Field(
        default=0.5, gt=0, le=1, description="fraction of nodes one full update may remove"
    )
    protect_max_hold: float = Field(
        default=300.0, ge=0, description="publish a held update anyway after this many seconds"
    )
    backoff_base: float = Field(
        default=0.5, gt=0, description="first retry delay of a failed server"
    )
    backoff_max: float = Field(default=30.0, gt=0, description="longest retry delay of a server")
    stale_after: float = Field(
        default=5.0, gt=0, description="seconds without a sync before /healthz reports unhealthy"
    )
    metrics: str | None = Field(
        default=None, description="HOST:PORT serving /metrics and /healthz (off by default)"
    )
    standby: bool = Field(
        default=False,
        description="wait for another sidecar on this region to exit instead of failing",
    )
    token: str | None = Field(default=None, description="bearer token for the server")
    token_file: Path | None = Field(default=None, description="file holding the bearer token")
    tls_ca: Path | None = Field(default=None, description="CA to verify the server (enables TLS)")
    tls_cert: Path | None = Field(default=None, description="client certificate for mutual TLS")
    tls_key: Path | None = Field(default=None, description="client key for mutual TLS")
    feedback: bool = Field(
        default=True,
        description="share callers' feedback: outlier ejection, least_request (docs/feedback.md)",
    )
    feedback_interval: float = Field(
        default=0.02, gt=0, le=0.05, description="seconds between two reads of the workers' rows"
    )
    feedback_rows: int = Field(
        default=256, ge=1, le=MAX_ROWS, description="worker processes that can report at once"
    )
    feedback_entries: int = Field(
        default=64, ge=1, le=MAX_ENTRIES, description="nodes one worker process can report on"
    )
    feedback_nodes: int = Field(
        default=65536, ge=1, le=MAX_IDS, description="nodes of the whole map that get an id"
    )
    feedback_mode: str = Field(
        default="0660", description="octal mode of <region>.feedback (workers write it)"
    )
    feedback_group: str | None = Field(
        default=None, description="group (name or gid) of <region>.feedback: the workers' group"
    )
    slow_start: float = Field(
        default=0.0,
        ge=0,
        le=MAX_SLOW_START_S,
        description="seconds a node that joins or comes back up ramps its weight over, for "
        "services whose meta sets no slow_start (0: off; docs/slow-start.md)",
    )
    outlier_consecutive_failures: int = Field(
        default=5, ge=0, description="eject a node after this many failures in a row (0: never)"
    )
    outlier_base_ejection_time: float = Field(
        default=30.0, gt=0, description="seconds; an ejection lasts this × times ejected"
    )
    outlier_max_ejection_time: float = Field(
        default=300.0, gt=0, le=MAX_EJECTION_S, description="longest ejection, seconds"
    )
    outlier_max_ejection_percent: float = Field(
        default=10.0, ge=0, le=100, description="share of a service ejected at most (≥ 1 node)"
    )
    outlier_interval: float = Field(
        default=10.0,
        gt=0,
        description="failure-percentage and success-rate window, multiplier decay (s)",
    )
    outlier_failure_percentage: float | None = Field(
        default=None, gt=0, le=100, description="eject nodes failing this % of calls (off)"
    )
    outlier_failure_percentage_minimum_hosts: int = Field(
        default=5, ge=1, description="failure percentage: nodes with enough calls needed"
    )
    outlier_failure_percentage_request_volume: int = Field(
        default=50, ge=1, description="failure percentage: calls a node needs in a window"
    )
    outlier_success_rate_enforcing: float = Field(
        default=100.0,
        ge=0,
        le=100,
        description="success rate: % chance an outlier is ejected (0: off)",
    )
    outlier_success_rate_stdev_factor: float = Field(
        default=1.9,
        ge=0,
        description="success rate: eject below mean - this x stdev (Envoy's 1900)",
    )
    outlier_success_rate_minimum_hosts: int = Field(
        default=5, ge=1, description="success rate: nodes with enough calls needed"
    )
    outlier_success_rate_request_volume: int = Field(
        default=100, ge=1, description="success rate: calls a node needs in a window"
    )
    outlier_half_open_tries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="half-open: worker rows offered a returning node's one trial request in "
        "turn before it returns anyway (0: no trial, it returns when its time is up)",
    )
    outlier_half_open_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="half-open: seconds one row has to send the trial and record its outcome",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least level logged"
    )

    @field_validator("server", "services", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("server")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one server is needed")
        for v in value:
            parse_address(v)
        return value

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_zone(value) if value else None

    @field_validator("feedback_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal file mode") from None
        if not 0 <= mode <= 0o777 or mode & 0o002:
            raise ValueError(f"{value!r}: must be 0-0777 and not world-writable")
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: str | None) -> str | None:
        if value:
            parse_address(value)
        return value or None

    def bearer_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return self.token_file.read_text().strip() or None
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return with_toml_file(settings_cls, init_settings, env_settings, "CLUSTERMAP_CONFIG")
