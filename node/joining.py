"""`resbm join`: one command that joins a running swarm on a fresh machine.

A joiner names the swarm (an id and bootstrap multiaddrs, or a coordinator) and says nothing about
the model: model, optimizer, data, batch and schedule come from the swarm's manifest. Only what is
this machine's own is configured here: where it listens and what it announces, whether it is
reachable, where it keeps its state, security, logs and metrics. A setting the user does give
explicitly that is also in the manifest is checked against it (and refused with the difference
named), never silently overridden.

Torch-, gRPC- and hivemind-free at import: `resbm --help` and `resbm config show` load this.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from common.identity import Identity
from node.config import DEVICE_FLAGS, MODEL_FLAGS
from node.errors import Unreachable
from node.node_config import NODE_FLAGS, NodeConfig
from node.ops_config import check_coordinator
from node.swarm.records import Manifest

log = logging.getLogger(__name__)

# the NodeConfig fields a manifest fixes; everything else is this machine's own
TRAINING_FIELDS = (
    "model",
    "optim",
    "seed",
    "batch_size",
    "microbatches",
    "wire_codec",
    "precision",
    "qat",
    "schedule",
    "overlap",
    "predict_weights",
    "predict_scale",
    "steps",
)


def coordinator_arg(value: str) -> str:
    """check_coordinator as an argparse `type` (`resbm join`, `resbm status`): argparse then
    names --coordinator in its error and exits 2."""
    try:
        return check_coordinator(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "resbm"


class JoinConfig(NodeConfig):
    """`resbm join`: a node whose training settings come from the swarm's manifest."""

    ASKS: ClassVar[bool] = True

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="where this node keeps its id, checkpoints and log, per swarm",
    )
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints")
    # fixed ports (the ones deploy/ and docker/ use): a port a volunteer can forward once, and
    # the same after every restart (`--listen HOST:0` / `--dht-listen .../tcp/0` for any port)
    listen: str = Field("0.0.0.0:7000", description="HOST:PORT to accept links on (0 = any port)")
    dht_listen: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/7200"],
        description="DHT host multiaddrs (all interfaces: other nodes bootstrap through us)",
    )

    @model_validator(mode="after")
    def _joinable(self) -> JoinConfig:
        if not self.coordinator and not self.initial_peers:
            raise ValueError(
                "say which swarm to join: --initial-peers MULTIADDR... (with --swarm) or "
                "--coordinator HOST:PORT"
            )
        return self

    def swarm_dir(self, swarm: str) -> Path:
        return self.state_dir / swarm


_NOT_FOR_JOIN = {"stage", "next", "resume", "events"}
JOIN_FLAGS: dict[str, tuple[str, dict]] = {
    **{k: v for k, v in NODE_FLAGS.items() if k not in MODEL_FLAGS and k not in _NOT_FOR_JOIN},
    "data": MODEL_FLAGS["data"],
    "threads": MODEL_FLAGS["threads"],
    **DEVICE_FLAGS,
    "coordinator": ("coordinator", {**NODE_FLAGS["coordinator"][1], "type": coordinator_arg}),
    "events": ("events", {"help": "write JSON-lines events here"}),
    "state_dir": ("state-dir", {"help": "node id, checkpoints, log (~/.local/share/resbm)"}),
}


class JoinError(RuntimeError):
    """The swarm cannot be joined as configured; the message says what to change."""


# ---- the manifest decides the training settings ---------------------------------------------
def training_settings(manifest: Manifest) -> dict[str, Any]:
    s = manifest.settings
    try:
        return {
            "model": s["model"],
            "optim": s["optim"],
            "seed": s["seed"],
            "batch_size": s["batch_size"],
            "microbatches": s["microbatches"],
            "wire_codec": s["codec"],
            "precision": s.get("precision", "fp32"),
            "qat": s.get("qat", False),
            "schedule": s.get("schedule", "1f1b"),
            "overlap": s.get("overlap"),
            "predict_weights": s.get("predict_weights", True),
            "predict_scale": s.get("predict_scale", 1.0),
            "steps": manifest.steps,
        }
    except KeyError as err:
        raise JoinError(f"the swarm's manifest lacks {err}: is it a resbm swarm?") from None


def check_version(manifest: Manifest) -> None:
    from node.version import VERSION

    if manifest.version.split(".")[:2] != VERSION.split(".")[:2]:
        raise JoinError(
            f"swarm {manifest.swarm!r} runs resbm {manifest.version}; this is resbm {VERSION}: "
            f"install resbm {manifest.version} (pip install 'resbm-swarm=={manifest.version}') "
            "and join again"
        )


def apply_manifest(cfg: JoinConfig, manifest: Manifest) -> JoinConfig:
    """The node config this joiner runs: the manifest's training settings, except those the user
    set explicitly (those are left for the manifest check to refuse, naming the difference)."""
    check_version(manifest)
    explicit = explicit_training_fields(cfg)
    update = {k: v for k, v in training_settings(manifest).items() if k not in explicit}
    update["swarm_data"] = swarm_data(cfg, manifest)
    data = {**cfg.model_dump(mode="json"), **update, "swarm": manifest.swarm}
    data["security"] = cfg.security  # keep the SecretStr (a JSON dump masks it)
    try:
        return JoinConfig.model_validate(data)
    except ValueError as err:
        raise JoinError(f"the swarm's manifest does not make a valid node config: {err}") from None


def swarm_data(cfg: NodeConfig, manifest: Manifest) -> str | None:
    """The swarm's data fingerprint when this machine has not got the data (a middle stage
    never needs it; stage 0 and the last stage fetch it once they know their stage, see
    `process.join_swarm`), None when `--data` (or the bundled corpus) is the swarm's."""
    from node.shards import data_info

    theirs = manifest.settings.get("data")
    ours = data_info(cfg.data).fingerprint
    if ours == theirs:
        return None
    if cfg.data is not None:
        fetch = (
            f", or leave --data out: stage 0 and the last stage fetch it from "
            f"{manifest.data_source}"
            if manifest.data_source
            else ""
        )
        raise JoinError(
            f"swarm {manifest.swarm!r} trains on data {theirs}, not on {cfg.data} ({ours}): "
            f"pass --data with the swarm's data{fetch}"
        )
    return theirs


def explicit_training_fields(cfg: JoinConfig) -> set[str]:
    """Training settings the user changed from their defaults (in a file, the env or a flag);
    the manifest check then compares them with the swarm's."""
    out = set()
    for name in TRAINING_FIELDS:
        default = JoinConfig.model_fields[name].get_default(call_default_factory=True)
        value = getattr(cfg, name)
        if name == "optim":  # its total_steps is derived from `steps`
            value = value.model_copy(update={"total_steps": default.total_steps})
        if name == "model":  # its vocab_size is derived from --data (checked by fingerprint)
            value = value.model_copy(update={"vocab_size": default.vocab_size})
        if value != default:
            out.add(name)
    return out


# ---- what this machine keeps between runs ---------------------------------------------------
def local_defaults(cfg: JoinConfig) -> JoinConfig:
    """A persistent key, so a persistent node id (a restarted node is the same node to the
    swarm), and checkpoints and a log under the state dir unless set elsewhere."""
    assert cfg.swarm is not None
    home = cfg.swarm_dir(cfg.swarm)
    home.mkdir(parents=True, exist_ok=True)
    update: dict[str, Any] = {}
    key = cfg.identity_file or home / "identity.key"
    update.update(identity_file=key, node_id=Identity.for_node(key, cfg.node_id).node_id)
    if cfg.checkpoint_dir is None:
        update["checkpoint_dir"] = home / "checkpoints"
    if cfg.ops.log_file is None:
        update["ops"] = cfg.ops.model_copy(update={"log_file": home / "node.log"})
    return cfg.model_copy(update=update)


# ---- asking a coordinator what the swarm is (in a spawned child: no gRPC in our process) ----
def swarm_from_coordinator(cfg: JoinConfig) -> tuple[Manifest, list[str]]:
    """The manifest and DHT bootstrap peers a coordinator serves."""
    from coordinator.client import CoordinatorError, CoordinatorUnavailable, status_in_subprocess

    try:
        st = status_in_subprocess(cfg.coordinator, cfg.connect_timeout_s, security=cfg.security)
    except CoordinatorUnavailable as err:
        raise Unreachable(str(err)) from None
    except CoordinatorError as err:
        raise JoinError(f"coordinator {cfg.coordinator}: {err}") from None
    return st.manifest, list(st.initial_peers)


# ---- the whole preparation, before the node's own start-up (process.run_join) -----------------
def prepare_join(cfg: JoinConfig):
    """Learn the swarm, start our DHT node, take the manifest's settings and pick a stage.
    Returns the node config to run and the running DHT (it forks: nothing of gRPC or torch
    compute exists in this process yet; a coordinator is asked from a spawned child)."""
    manifest = None
    if cfg.coordinator:  # its manifest, not whatever the DHT holds (anyone can store one)
        manifest, peers = swarm_from_coordinator(cfg)
        if cfg.swarm and cfg.swarm != manifest.swarm:
            raise JoinError(
                f"coordinator {cfg.coordinator} serves swarm {manifest.swarm!r}, "
                f"not {cfg.swarm!r} (--swarm)"
            )
        peers = list(cfg.initial_peers) or peers
        cfg = cfg.model_copy(update={"initial_peers": peers, "swarm": manifest.swarm})
        check_version(manifest)  # before anything else starts
    from node.swarm.dht import DHTUnavailable, SwarmDHT, start_dht

    dht = start_dht(
        cfg.initial_peers, cfg.dht_listen, cfg.security.token_value(), not cfg.reachable,
        cfg.swarm,
    )  # fmt: skip
    try:
        import asyncio

        swarm = SwarmDHT(dht, cfg.swarm)
        if manifest is None:
            try:
                manifest = asyncio.run(swarm.get_manifest(True, cfg.coordinator_id))
            except DHTUnavailable as err:
                raise Unreachable(f"{err}: check --initial-peers and the network") from None
            except ValueError as err:  # ManifestConflict: it names the setting to pin
                raise JoinError(str(err)) from None
            if manifest is None:
                raise JoinError(
                    f"no swarm {cfg.swarm!r} found through {', '.join(cfg.initial_peers)}: "
                    "check the swarm id (--swarm) and that its peers are up"
                )
        cfg = local_defaults(apply_manifest(cfg, manifest))
        if cfg.wanted_stage is None:
            cfg = cfg.model_copy(update=asyncio.run(_pick_stage(cfg, swarm)))
        if cfg.reachable and cfg.announce is None:
            cfg = cfg.model_copy(update={"announce": guess_announce(dht, cfg.listen)})
        log.info(
            "joining swarm %r as %s: %d stages, d_model %d, %d steps",
            cfg.swarm,
            cfg.node_id,
            cfg.model.n_stages,
            cfg.model.d_model,
            cfg.steps,
        )
    except BaseException:
        dht.shutdown()
        raise
    return cfg, dht


async def _pick_stage(cfg: JoinConfig, swarm) -> dict[str, Any]:
    """With a coordinator it decides (Join); without one, the same rule on the DHT's map. A node
    that served a stage before goes back to it: its checkpoint is of that stage."""
    last = cfg.swarm_dir(cfg.swarm) / "stage"
    if last.is_file() and last.read_text().strip().isdigit():
        stage = int(last.read_text().strip())
        if stage < cfg.model.n_stages:
            return {"wanted_stage": stage, "stage": stage}
    if cfg.coordinator:
        return {}
    from coordinator.assignment import assign

    smap = await swarm.swarm_map(cfg.model.n_stages)
    others = {k: {p: r for p, r in rs.items() if p != cfg.node_id} for k, rs in smap.items()}
    stage = assign(others, cfg.model.n_stages)
    return {"wanted_stage": stage, "stage": stage}


def remember_stage(cfg: NodeConfig) -> None:
    """Called once a node knows its stage: where a restart of it goes back to."""
    state_dir = getattr(cfg, "state_dir", None)
    if state_dir is not None and cfg.swarm:
        path = Path(state_dir) / cfg.swarm / "stage"
        path.write_text(f"{cfg.stage}\n")


def guess_announce(dht, listen: str) -> str | None:
    """HOST:PORT peers should dial when --announce is not given: the listen address if it is a
    concrete one, else the first non-loopback IPv4 address the DHT sees us at. Port 0 (any)
    stays 0 here: the node announces its bound port (membership.announce)."""
    host, port = listen.rsplit(":", 1)
    if host not in ("0.0.0.0", "", "[::]", "::"):
        return listen
    import ipaddress

    seen = []
    for maddr in (str(a) for a in dht.get_visible_maddrs()):
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            with contextlib.suppress(ValueError):
                seen.append(ipaddress.ip_address(parts[2]))
    public = [ip for ip in seen if ip.is_global]
    private = [ip for ip in seen if not ip.is_loopback and not ip.is_global]
    if public:
        return f"{public[0]}:{port}"
    if private:
        log.warning(
            "announcing the private address %s: peers outside this network cannot dial it; "
            "set --announce PUBLIC_HOST:PORT (and forward the port), or run with --no-reachable",
            private[0],
        )
        return f"{private[0]}:{port}"
    log.warning(
        "no address to announce but loopback: only this machine can dial this node; set "
        "--announce PUBLIC_HOST:PORT, or run with --no-reachable"
    )
    return None
