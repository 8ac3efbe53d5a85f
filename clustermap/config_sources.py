"""Where cm-server's and cm-sidecar's settings come from, in one place for both models.

Flags (passed to the model as init values) win over ``CLUSTERMAP_*`` variables, which win over
the TOML file named by a variable of each command's own (the two differ so that both commands
can run from one environment, as ``cmctl up`` runs them). Imported by the settings models only:
it needs pydantic-settings, which the worker-side ``import clustermap`` never loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = ["with_toml_file"]


def with_toml_file(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    file_variable: str,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of a ``settings_customise_sources``: init values, the environment, then the
    file ``$file_variable`` names, if any. A file that is named must be readable (a typo in the
    path must not run on defaults): ``ValueError`` with a one-line message otherwise."""
    config = os.environ.get(file_variable)
    sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
    if config:
        try:
            Path(config).open("rb").close()
        except OSError as exc:
            raise ValueError(f"cannot read config file {config}: {exc.strerror}") from None
        sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
    return tuple(sources)
