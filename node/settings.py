"""Loading a typed process config from defaults < TOML file < environment (RESBM_*) < CLI flags.

Every process type (train, node, coordinator, ...) has one pydantic-settings class; this module is
the one place that resolves it, and the one place that turns a validation error into a message
that names the setting, its flag and its environment variable, and, for a value read from the
config file, the file and its line: whoever fixes a config should not have to guess which knob a
message is about, nor where it was set.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
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
        sources = Sources(cls, cli or {}, None if file is None else Path(file))
        raise ConfigError(describe(err, flags or {}, sources)) from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:  # only the file is parsed
        raise ConfigError(unparsable(Path(str(file)), err)) from None


# ---- the settings of a class ------------------------------------------------------------------
def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class of a field typed `Sub` or `Sub | None`, else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def settings_of(cls: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every setting of `cls` by dotted name -> whether it is a table (a sub-model)."""
    out: dict[str, bool] = {}
    for name, field in cls.model_fields.items():
        sub = _submodel(field.annotation)
        out[prefix + name] = sub is not None
        if sub is not None:
            out.update(settings_of(sub, f"{prefix}{name}."))
    return out


def setting_path(cls: type[BaseModel], loc: tuple) -> str:
    """The setting an error location is about: the leading parts of `loc` that are field names
    (("initial_peers", 0) -> "initial_peers"); "" for the whole config."""
    path: list[str] = []
    model: type[BaseModel] | None = cls
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        path.append(part)
        model = _submodel(model.model_fields[part].annotation)
    return ".".join(path)


def env_var(cls: type[BaseModel], dotted: str) -> str | None:
    """The environment variable pydantic-settings reads for a setting that is not a table, else
    None: a table (`model`) is set through its members' variables, and a nested setting only
    where the class has a nested delimiter. Never a name that would be ignored."""
    kinds = settings_of(cls)
    if not issubclass(cls, BaseSettings) or kinds.get(dotted, True):
        return None
    nested = cls.model_config.get("env_nested_delimiter")
    if "." in dotted and not nested:
        return None
    prefix = cls.model_config.get("env_prefix") or ""
    return prefix + dotted.replace(".", nested or "").upper()


class Sources:
    """The inputs of one resolution, to say where an offending value was set."""

    def __init__(self, cls: type[BaseModel], cli: dict[str, Any], file: Path | None) -> None:
        self.cls, self.cli, self.file = cls, cli, file
        self._lines: dict[str, int] | None = None

    def of(self, dotted: str) -> str | None:
        """Where the value that won for `dotted` came from, unless it was a flag (the user just
        typed it): "in FILE, line N" or "by RESBM_X"; None for a default or a derived value."""
        if self.cli.get(dotted) is not None:
            return None
        env = env_var(self.cls, dotted)
        if env is not None and env in {k.upper() for k in os.environ}:
            return f"by {env}"
        return self.in_file(dotted)

    def in_file(self, dotted: str) -> str | None:
        if self.file is None:
            return None
        if self._lines is None:
            self._lines = key_lines(self.file)
        if dotted in self._lines:
            return f"in {self.file}, line {self._lines[dotted]}"
        return f"in {self.file}" if _file_has(self.file, dotted.split(".")) else None


def key_lines(file: Path) -> dict[str, int]:
    """dotted key -> line, for a TOML file's `key = value` lines under their [table] headers
    (keys inside inline tables are not found, and are then named without a line)."""
    if file.suffix == ".json":
        return {}
    out: dict[str, int] = {}
    table = ""
    for n, raw in enumerate(file.read_text(errors="replace").splitlines(), start=1):
        line = raw.strip()
        if header := re.match(r"^\[\s*([^\[\]]+?)\s*\]", line):
            table = _unquote(header[1])
            out.setdefault(table, n)
        elif key := re.match(r"^([\w\-.\"' ]+?)\s*=", line):
            out.setdefault(f"{table}.{_unquote(key[1])}".lstrip("."), n)
    return out


def _unquote(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def _file_has(file: Path, path: list[str]) -> bool:
    try:
        text = file.read_text()
        node: Any = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError):
        return False
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ---- messages ---------------------------------------------------------------------------------
def unparsable(file: Path, err: ValueError) -> str:
    """A config file that does not parse: the file, the line and a caret under the column (the
    parser's own message says "at line 2, column 8" but not which file)."""
    if isinstance(err, json.JSONDecodeError):
        kind, line, col, what = "JSON", err.lineno, err.colno, err.msg
    else:
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)", str(err))
        kind, what = "TOML", str(err).replace(at[0], "") if at else str(err)
        line, col = (int(at[1]), int(at[2])) if at else (0, 0)
    where = f": line {line}, column {col}" if line else ""
    out = f"config file {file} is not valid {kind}{where}: {what} (check --config)"
    text = file.read_text(errors="replace").splitlines()
    if 0 < line <= len(text):
        out += f"\n  {line} | {text[line - 1]}\n  {' ' * len(str(line))} | {' ' * (col - 1)}^"
    return out


def describe(err: ValidationError, flags: dict[str, str], sources: Sources | None = None) -> str:
    """One line per error: the setting it is about, with its flag and environment variable,
    the message, and where the offending value was set. An error of a whole table or of the
    whole config (a cross-field check) is put on the settings its message names."""
    cls = sources.cls if sources else None
    lines = ["invalid configuration:"]
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append("  " + unknown(e["loc"], flags, sources))
            continue
        dotted = setting_path(cls, e["loc"]) if cls else ".".join(str(p) for p in e["loc"])
        table = cls is None or not dotted or settings_of(cls).get(dotted, False)
        named = named_in(msg, dotted, flags, cls) if table else []
        if named:
            lines.append(f"  {_label(named, flags, cls)}: {msg}")
            continue
        line = f"  {_label([dotted], flags, cls)}: {msg}"
        cross_field = table and e["type"] == "value_error"  # no one value to blame
        where = sources.of(dotted) if sources and dotted and not cross_field else None
        lines.append(line + (f" (set {where})" if where else ""))
    return "\n".join(lines)


def _label(settings: list[str], flags: dict[str, str], cls: type[BaseModel] | None) -> str:
    """Settings with their flags and variables: `setting 'optim.lr' (--lr, RESBM_OPTIM__LR)`."""
    parts = []
    for dotted in settings:
        env = env_var(cls, dotted) if cls and dotted else None
        hint = ", ".join(h for h in (f"--{flags[dotted]}" if dotted in flags else "", env) if h)
        parts.append(
            (f"'{dotted}'" if dotted else "(whole config)") + (f" ({hint})" if hint else "")
        )
    return ("setting " if len(parts) == 1 else "settings ") + ", ".join(parts)


def named_in(msg: str, scope: str, flags: dict[str, str], cls: type[BaseModel] | None) -> list[str]:
    """The settings under `scope` (a table's dotted name, "" = the whole config) that a
    cross-field message names, in the order it names them: by dotted name, by name within the
    table, by the snake_case leaf of a nested one (`n_stages`), or by --flag. Across the whole
    config a plain word (`swarm`, `data`) counts only as its --flag: prose uses those words."""
    known = [d for d, table in settings_of(cls).items() if not table] if cls else []
    known += [d for d in flags if d not in known]
    under = [d for d in known if not scope or d.startswith(scope + ".")]
    relative = {d: d.removeprefix(scope + ".") if scope else d for d in under}
    found: list[tuple[int, str]] = []
    for dotted in under:
        rel, leaf = relative[dotted], dotted.rpartition(".")[2]
        names = {n for n in (dotted, rel) if scope or "." in n or "_" in n}
        if "_" in leaf and leaf not in relative.values():  # `max_in_flight` is the top-level one
            names.add(leaf)
        if dotted in flags:
            names |= {f"--{flags[dotted]}", f"--no-{flags[dotted]}"}
        at = [m.start() for n in names if (m := re.search(_word(n), msg))]
        if at:
            found.append((min(at), dotted))
    return [d for _, d in sorted(found)]


def _word(name: str) -> str:
    return rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])"


def unknown(loc: tuple, flags: dict[str, str], sources: Sources | None) -> str:
    """An unknown setting: where it was given, and the nearest valid one (a typo, or a setting
    put in the wrong table: a top-level `d_model` means [model] d_model)."""
    dotted = ".".join(str(p) for p in loc)
    env = ENV_PREFIX + dotted.replace(".", ENV_NESTED).upper()
    where = sources.in_file(dotted) if sources else None
    if where is None and env in {k.upper() for k in os.environ}:
        where = f"from {env}"
    line = f"unknown setting '{dotted}'" + (f" {where}" if where else "")
    near = nearest(dotted, sources.cls if sources else None, flags)
    if near is None:
        return line + ": no such setting (`resbm config show COMMAND` lists them)"
    hint = f" (--{flags[near]})" if near in flags else ""
    return f"{line}: did you mean '{near}'{hint}?"


def nearest(dotted: str, cls: type[BaseModel] | None, flags: dict[str, str]) -> str | None:
    """The valid setting closest to an unknown one: the same name in another table, else the
    closest name in the same table, else the closest name in any table."""
    known = list(settings_of(cls)) if cls else list(flags)
    parent, _, leaf = dotted.rpartition(".")
    by_leaf: dict[str, list[str]] = {}
    for d in known:
        by_leaf.setdefault(d.rpartition(".")[2], []).append(d)
    if leaf in by_leaf:
        return by_leaf[leaf][0]
    siblings = {d.rpartition(".")[2]: d for d in known if d.rpartition(".")[0] == parent}
    if close := difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6):
        return siblings[close[0]]
    if close := difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8):
        return by_leaf[close[0]][0]
    return None


# ---- flags ------------------------------------------------------------------------------------
def metavar(flag: str, kwargs: dict) -> dict:
    """argparse names a flag's value after its `dest`, here a dotted setting (`MODEL.D_MODEL`):
    name it after the flag instead (`D_MODEL`), unless the table names it or there is no value
    (a switch) or the choices are listed."""
    if "metavar" in kwargs or "action" in kwargs or "choices" in kwargs:
        return kwargs
    return {**kwargs, "metavar": flag.upper().replace("-", "_")}


def default_of(cls: type[BaseModel], dotted: str) -> Any:
    """The default of a setting of `cls` (None when it has none, or `dotted` is not one)."""
    model: type[BaseModel] | None = cls
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    field = model.model_fields.get(leaf) if model else None
    if field is None:
        return None
    return field.get_default(call_default_factory=True)


def with_default(kwargs: dict, value: Any) -> dict:
    """Add "(default X)" to a flag's help unless it already speaks of its default: the flag's
    own argparse default is None ("not given"), so argparse cannot show the real one, and one
    table serves commands whose defaults differ (`join` checkpoints every 50 steps, `node` not)."""
    help_ = kwargs.get("help")
    if value is None or not help_ or help_ is argparse.SUPPRESS or "default" in help_:
        return kwargs
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, list):
        text = " ".join(map(str, value)) or "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(getattr(value, "value", value))  # an Enum by its value
    return {**kwargs, "help": f"{help_} (default {text.replace('%', '%%')})"}


def add_flags(
    parser: argparse.ArgumentParser,
    table: dict[str, tuple[str, dict]],
    cls: type[BaseModel] | None = None,
) -> None:
    """Register flags from a {dotted setting: (flag, argparse kwargs)} table; default None
    means "not given", so lower-priority sources still apply. With `cls`, each help text
    names the setting's default in that class."""
    for dotted, (flag, kwargs) in table.items():
        if cls is not None:
            kwargs = with_default(kwargs, default_of(cls, dotted))
        parser.add_argument(f"--{flag}", dest=dotted, default=None, **metavar(flag, kwargs))


def from_args(cls: type[S], args: argparse.Namespace, table: dict[str, tuple[str, dict]]) -> S:
    """The config of a CLI command: its flags (per `table`) over env over `--config`."""
    flags = {dotted: flag for dotted, (flag, _) in table.items()}
    return load_settings(cls, cli_values(args, table), getattr(args, "config", None), flags)


def cli_values(args: argparse.Namespace, table: dict[str, tuple[str, dict]]) -> dict[str, Any]:
    return {dotted: getattr(args, dotted) for dotted in table}
