"""`resbm config show KIND [flags]`: the resolved config of a process, as TOML.

It resolves exactly as the process would (defaults < --config file < RESBM_* env < flags), so it
answers "what will this node actually run with?", and its output is a valid config file: save it,
edit it, pass it back with --config. Secrets are never printed, nor settings that are not the
user's to choose: fault injection for tests (fields marked HIDDEN in node/node_config.py) and,
for `join`, the stage, which the coordinator assigns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from pydantic import BaseModel

# settings a command has but does not let its user choose, left out of its `config show`
# join: the coordinator assigns the stage; next, resume and events are not join's to set
NOT_SHOWN: dict[str, set[str]] = {"join": {"stage", "next", "resume", "events"}}


def kinds() -> dict[str, tuple[type, dict]]:
    from coordinator.config import COORDINATOR_FLAGS, CoordinatorConfig
    from node.config import TRAIN_FLAGS, TrainConfig
    from node.joining import JOIN_FLAGS, JoinConfig
    from node.node_config import NODE_FLAGS, NodeConfig

    return {
        "train": (TrainConfig, TRAIN_FLAGS),
        "node": (NodeConfig, NODE_FLAGS),
        "join": (JoinConfig, JOIN_FLAGS),
        "coordinator": (CoordinatorConfig, COORDINATOR_FLAGS),
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    from node.settings import add_flags

    p = sub.add_parser("config", help="show the resolved config of a command")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="show")
    show = csub.add_parser(
        "show",
        help="print the resolved config (flags > RESBM_* env > --config > defaults) as TOML",
    )
    ksub = show.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, (cls, flags) in kinds().items():
        k = ksub.add_parser(kind, help=f"the config `resbm {kind}` would run with")
        k.add_argument("--config", metavar="PATH", help="TOML file with settings")
        k.add_argument("--json", action="store_true", help="print JSON instead of TOML")
        add_flags(k, flags, cls)
        k.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from node.settings import from_args

    cls, flags = kinds()[args.kind]
    cfg = from_args(cls, args, flags)
    data = public_dump(cfg, args.kind)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        head = f"# resolved config of `resbm {args.kind}`\n"
        if args.kind == "join":
            head += (
                "# model, optim, seed, batch_size, microbatches, wire_codec and steps are taken "
                "from the swarm's manifest when joining; set one only to insist on it\n"
            )
        sys.stdout.write(head + to_toml(data))
    return 0


def public_dump(cfg: BaseModel, kind: str | None = None) -> dict[str, Any]:
    """The config as plain data, without secrets (a token is never shown), hidden settings, or
    what `kind`'s user does not choose (NOT_SHOWN)."""
    data = cfg.model_dump(mode="json")
    _drop_hidden(type(cfg), data)
    for name in NOT_SHOWN.get(kind or "", ()):
        data.pop(name, None)
    security = data.get("security")
    if isinstance(security, dict):
        security.pop("token", None)
        security.pop("token_file", None)
    return data


def _drop_hidden(cls: type[BaseModel], data: dict[str, Any]) -> None:
    """Remove, in place and in sub-tables too, the fields marked json_schema_extra hidden."""
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("hidden"):
            data.pop(name, None)
        elif isinstance(data.get(name), dict):
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                _drop_hidden(sub, data[name])


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v if x is not None) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Scalars of a table first, then its sub-tables; an unset (None) value is a comment."""
    lines: list[str] = []
    for key, value in data.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif not isinstance(value, dict):
            lines.append(f"{key} = {_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            out += f"\n[{name}]\n" + to_toml(value, f"{name}.")
    return out
