"""Loading a typed process config from defaults < TOML file < environment (RESBM_*) < CLI flags.

Every process type (train, node, coordinator, ...) has one pydantic-settings class; this module is
the one place that resolves it, and the one place that turns a validation error into a message
that names the setting, its flag and its environment variable.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, JsonConfigSettingsSource, TomlConfigSettingsSource

ENV_PREFIX = "RESBM_"
ENV_NESTED = "__"

S = TypeVar("S", bound=BaseSettings)


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending setting."""


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.d_model": 64} -> {"model": {"d_model": 64}}; None values are dropped."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", ENV_NESTED).upper()


def load_settings(
    cls: type[S],
    cli: dict[str, Any] | None = None,
    file: str | Path | None = None,
    flags: dict[str, str] | None = None,
) -> S:
    """Resolve `cls` from its sources. `cli` is flat and dotted; `flags` maps dotted -> --flag.
    `file` is TOML, or JSON when it ends in .json (how launchers hand a resolved config on)."""
    if file is not None and not Path(file).is_file():
        raise ConfigError(f"config file not found: {file} (check --config)")

    class _Resolved(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(
            cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            sources = [init_settings, env_settings]
            if file is not None and Path(file).suffix == ".json":  # what launchers write
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=Path(file)))
            elif file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(file)))
            return tuple(sources)

    try:
        resolved = _Resolved(**nest(cli or {}))
        return cls.model_validate(resolved.model_dump())
    except ValidationError as err:
        raise ConfigError(describe(err, flags or {})) from None


def describe(err: ValidationError, flags: dict[str, str]) -> str:
    lines = ["invalid configuration:"]
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"]) or "(whole config)"
        where = [f"--{flags[dotted]}"] if dotted in flags else []
        where.append(env_name(dotted) if e["loc"] else "")
        hint = ", ".join(w for w in where if w)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  setting '{dotted}'" + (f" ({hint})" if hint else "") + f": {msg}")
    return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser, table: dict[str, tuple[str, dict]]) -> None:
    """Register flags from a {dotted setting: (flag, argparse kwargs)} table; default None
    means "not given", so lower-priority sources still apply."""
    for dotted, (flag, kwargs) in table.items():
        parser.add_argument(f"--{flag}", dest=dotted, default=None, **kwargs)


def from_args(cls: type[S], args: argparse.Namespace, table: dict[str, tuple[str, dict]]) -> S:
    """The config of a CLI command: its flags (per `table`) over env over `--config`."""
    flags = {dotted: flag for dotted, (flag, _) in table.items()}
    return load_settings(cls, cli_values(args, table), getattr(args, "config", None), flags)


def cli_values(args: argparse.Namespace, table: dict[str, tuple[str, dict]]) -> dict[str, Any]:
    return {dotted: getattr(args, dotted) for dotted in table}
