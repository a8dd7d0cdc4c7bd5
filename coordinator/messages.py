"""The coordinator's typed requests and replies, and the only place that touches their protobuf.

Requests are untrusted input: `*_from_pb` checks every field and raises `Refused` with
INVALID_ARGUMENT naming the field; `admit` then checks that a well-formed JoinRequest may join
this swarm (FAILED_PRECONDITION, with a message that says what to change). Both are pure, so the
refusal texts are unit-tested without a server. Codes are grpc.StatusCode names (strings), so
this module needs protobuf but not grpc.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from common.identity import is_node_id
from node.swarm.manifest import differences
from node.swarm.records import SWARM_ID, Manifest, NodeRecord
from node.wire._pb import coordinator_pb2 as pb
from node.wire.kinds import NODE_ID_PATTERN

NODE_ID = re.compile(NODE_ID_PATTERN)
VERSION_RE = re.compile(r"^\d{1,4}\.\d{1,4}(\.[0-9A-Za-z.+-]{1,22})?$")
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
MAX_THROUGHPUT = 1e6
MAX_SETTINGS_JSON = 16_384


class Refused(Exception):
    """A request the coordinator will not serve. `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # picklable (it crosses join_in_subprocess's process boundary)
        return (type(self), (self.code, self.message))


def _bad(what: str, why: str) -> Refused:
    return Refused("INVALID_ARGUMENT", f"{what}: {why}")


@dataclass(frozen=True)
class Signature:
    """A node's signature over a request that names it (coordinator/signing.py)."""

    public_key: bytes
    signed_at: float
    signature: bytes


@dataclass(frozen=True)
class JoinRequest:
    node_id: str
    swarm: str
    version: str
    fingerprint: str
    throughput: float
    wanted_stage: int = -1
    settings: dict[str, Any] | None = None  # the node's swarm settings: refusals name the diff
    signed: Signature | None = None


@dataclass(frozen=True)
class JoinResult:
    stage: int
    manifest: Manifest
    initial_peers: list[str]
    coordinator_id: str = ""  # the id of the key that seals the manifest and moves (#10 M1)


@dataclass(frozen=True)
class LeaveRequest:
    node_id: str
    stage: int
    signed: Signature | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    node_id: str
    state: str
    throughput: float
    load: int
    step: int
    address: str
    version: str = ""
    loss: float | None = None

    @classmethod
    def of(cls, r: NodeRecord) -> ReplicaStatus:
        return cls(
            r.peer_id, r.state.value, r.throughput, r.load, r.step, r.address, r.version, r.loss
        )


@dataclass(frozen=True)
class SwarmStatus:
    manifest: Manifest
    n_stages: int
    current_step: int
    recent_loss: float | None
    stages: list[list[ReplicaStatus]]  # index = stage
    initial_peers: list[str] = field(default_factory=list)
    # the coordinator's loss cache (coordinator/history.py): (step, loss, unix time) by step
    loss_history: list[tuple[int, float, float]] = field(default_factory=list)
    history_since: float | None = None  # when this coordinator began sampling
    model_params: int = 0
    # per stage, the newest checkpoint step announced in the DHT (None: none), what a stage that
    # lost every replica resumes from
    checkpoint_steps: list[int | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "swarm": self.manifest.swarm,
            "fingerprint": self.manifest.fingerprint,
            "version": self.manifest.version,
            "n_stages": self.n_stages,
            "current_step": self.current_step,
            "recent_loss": self.recent_loss,
            "stages": [[asdict(r) for r in reps] for reps in self.stages],
            "initial_peers": self.initial_peers,
            "manifest": self.manifest.model_dump(mode="json", exclude_none=True),
            "model_params": self.model_params,
            "history_since": self.history_since,
            "loss_history": [list(p) for p in self.loss_history],
            "checkpoint_steps": self.checkpoint_steps,
        }


def summarize(
    swarm_map,
    manifest: Manifest,
    n_stages: int,
    peers: list[str],
    checkpoints: dict[int, int] | None = None,
) -> SwarmStatus:
    """The swarm map (stage -> peer -> NodeRecord) as a status: current step = the highest any
    node reports; recent loss = the mean loss of the last stage's replicas at the highest step
    for which one reports a loss; `checkpoints`: stage -> newest announced checkpoint step."""
    stages = [
        [ReplicaStatus.of(r) for _, r in sorted(swarm_map.get(k, {}).items())]
        for k in range(n_stages)
    ]
    current = max((r.step for reps in stages for r in reps), default=0)
    last = [r for r in stages[-1] if r.loss is not None]
    loss = None
    if last:
        top = max(r.step for r in last)
        at_top = [r.loss for r in last if r.step == top]
        loss = sum(at_top) / len(at_top)
    ckpt = [(checkpoints or {}).get(k) for k in range(n_stages)]
    return SwarmStatus(
        manifest, n_stages, current, loss, stages, list(peers), checkpoint_steps=ckpt
    )


# ---- validation ------------------------------------------------------------------------------
def check_node_id(node_id: str) -> str:
    if not NODE_ID.fullmatch(node_id):  # match() took a trailing newline (review)
        raise _bad("node_id", f"{node_id[:64]!r} is not 1-128 of A-Z a-z 0-9 . _ : @ + = -")
    return node_id


def admit(req: JoinRequest, manifest: Manifest, n_stages: int) -> None:
    """Raise Refused unless a well-formed `req` may join the swarm of `manifest`."""
    if req.swarm != manifest.swarm:
        raise Refused(
            "FAILED_PRECONDITION",
            f"this coordinator serves swarm {manifest.swarm!r}, not {req.swarm!r} (check --swarm)",
        )
    if req.version.split(".")[:2] != manifest.version.split(".")[:2]:
        raise Refused(
            "FAILED_PRECONDITION",
            f"swarm {manifest.swarm!r} runs resbm {manifest.version}; this node runs "
            f"{req.version}: install resbm {manifest.version} to join it",
        )
    if not -1 <= req.wanted_stage < n_stages:
        raise _bad("wanted_stage", f"{req.wanted_stage} is not -1 (any) or 0..{n_stages - 1}")
    if req.fingerprint != manifest.fingerprint:
        raise Refused("FAILED_PRECONDITION", _mismatch(req, manifest))


def _mismatch(req: JoinRequest, manifest: Manifest) -> str:
    head = (
        f"swarm config mismatch: this node's settings have fingerprint {req.fingerprint}, swarm "
        f"{manifest.swarm!r} has {manifest.fingerprint}"
    )
    if req.settings is None:
        return (
            f"{head}; make its model, optim, seed, batch_size, microbatches, data (corpus) and "
            "wire_codec settings the swarm's (see `resbm status --coordinator HOST:PORT --json`)"
        )
    try:
        theirs = manifest.model_copy(update={"settings": req.settings})
        diff = differences(manifest, theirs)
    except Exception:  # settings of an odd shape: say what we can
        diff = []
    if not diff:
        return f"{head}, yet the settings it sent equal the swarm's (another resbm build?)"
    return f"{head}; change these settings to the swarm's:\n  " + "\n  ".join(diff)


# ---- protobuf <-> typed ----------------------------------------------------------------------
def join_request_to_pb(req: JoinRequest) -> pb.JoinRequest:
    return pb.JoinRequest(
        node_id=req.node_id,
        swarm=req.swarm,
        version=req.version,
        fingerprint=req.fingerprint,
        throughput=req.throughput,
        wanted_stage=req.wanted_stage,
        settings_json="" if req.settings is None else json.dumps(req.settings, sort_keys=True),
        signed=_signature_to_pb(req.signed),
    )


def _signature_to_pb(sig: Signature | None) -> pb.Signature | None:
    if sig is None:
        return None
    return pb.Signature(public_key=sig.public_key, signed_at=sig.signed_at, signature=sig.signature)


def _signature_from_pb(msg) -> Signature | None:
    """Untrusted bytes of any length: coordinator/signing.py checks them."""
    if not msg.HasField("signed"):
        return None
    s = msg.signed
    return Signature(bytes(s.public_key[:64]), float(s.signed_at), bytes(s.signature[:128]))


def join_request_from_pb(msg: pb.JoinRequest) -> JoinRequest:
    check_node_id(msg.node_id)
    if not SWARM_ID.match(msg.swarm):
        raise _bad("swarm", f"{msg.swarm[:64]!r} is not a swarm id (1-64 of a-z 0-9 . _ -)")
    if not VERSION_RE.match(msg.version):
        raise _bad("version", f"{msg.version[:32]!r} is not a resbm version like 0.2.0")
    if not FINGERPRINT.match(msg.fingerprint):
        raise _bad("fingerprint", f"{msg.fingerprint[:32]!r} is not 16 lower-case hex digits")
    if not (math.isfinite(msg.throughput) and 0 <= msg.throughput <= MAX_THROUGHPUT):
        raise _bad("throughput", f"{msg.throughput} is not in [0, {MAX_THROUGHPUT:g}]")
    if msg.wanted_stage < -1:
        raise _bad("wanted_stage", f"{msg.wanted_stage} is not -1 (any) or a stage")
    settings = None
    if msg.settings_json:
        if len(msg.settings_json) > MAX_SETTINGS_JSON:
            raise _bad("settings_json", f"longer than {MAX_SETTINGS_JSON} characters")
        try:
            settings = json.loads(msg.settings_json)
        except ValueError as err:
            raise _bad("settings_json", f"not JSON ({err})") from None
        if not isinstance(settings, dict):
            raise _bad("settings_json", "not a JSON object")
    return JoinRequest(
        msg.node_id,
        msg.swarm,
        msg.version,
        msg.fingerprint,
        msg.throughput,
        msg.wanted_stage,
        settings,
        _signature_from_pb(msg),
    )


def _manifest_from_json(text: str) -> Manifest:
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as err:
        msg = err.errors()[0]["msg"]
        raise ValueError(f"the coordinator sent a malformed manifest: {msg}") from None


def join_result_to_pb(res: JoinResult) -> pb.JoinReply:
    return pb.JoinReply(
        stage=res.stage,
        manifest_json=res.manifest.model_dump_json(),
        initial_peers=list(res.initial_peers),
        coordinator_id=res.coordinator_id,
    )


def join_result_from_pb(msg: pb.JoinReply) -> JoinResult:
    if msg.coordinator_id and not is_node_id(msg.coordinator_id):
        raise ValueError(f"the coordinator sent a malformed id {msg.coordinator_id[:40]!r}")
    return JoinResult(
        msg.stage,
        _manifest_from_json(msg.manifest_json),
        list(msg.initial_peers),
        msg.coordinator_id,
    )


def leave_request_to_pb(req: LeaveRequest) -> pb.LeaveRequest:
    return pb.LeaveRequest(
        node_id=req.node_id, stage=req.stage, signed=_signature_to_pb(req.signed)
    )


def leave_request_from_pb(msg: pb.LeaveRequest, n_stages: int) -> LeaveRequest:
    check_node_id(msg.node_id)
    if msg.stage >= n_stages:
        raise _bad("stage", f"{msg.stage} does not exist: the swarm has {n_stages} stages")
    return LeaveRequest(msg.node_id, msg.stage, _signature_from_pb(msg))


def status_to_pb(st: SwarmStatus) -> pb.StatusReply:
    return pb.StatusReply(
        manifest_json=st.manifest.model_dump_json(),
        n_stages=st.n_stages,
        current_step=st.current_step,
        recent_loss=st.recent_loss,
        stages=[
            pb.StageReplicas(
                stage=k,
                replicas=[
                    pb.Replica(
                        node_id=r.node_id,
                        state=r.state,
                        throughput=r.throughput,
                        load=r.load,
                        step=r.step,
                        address=r.address,
                        version=r.version,
                        loss=r.loss,
                    )
                    for r in reps
                ],
                checkpoint_step=st.checkpoint_steps[k] if k < len(st.checkpoint_steps) else None,
            )
            for k, reps in enumerate(st.stages)
        ],
        initial_peers=list(st.initial_peers),
        loss_history=[pb.LossPoint(step=s, loss=v, time=t) for s, v, t in st.loss_history],
        history_since=st.history_since or 0.0,
        model_params=st.model_params,
    )


def status_from_pb(msg: pb.StatusReply) -> SwarmStatus:
    stages: list[list[ReplicaStatus]] = [[] for _ in range(msg.n_stages)]
    ckpt: list[int | None] = [None] * msg.n_stages
    for sr in msg.stages:
        if sr.stage < msg.n_stages:
            ckpt[sr.stage] = sr.checkpoint_step if sr.HasField("checkpoint_step") else None
            stages[sr.stage] = [
                ReplicaStatus(
                    r.node_id,
                    r.state,
                    r.throughput,
                    r.load,
                    r.step,
                    r.address,
                    r.version,
                    r.loss if r.HasField("loss") else None,
                )
                for r in sr.replicas
            ]
    return SwarmStatus(
        manifest=_manifest_from_json(msg.manifest_json),
        n_stages=msg.n_stages,
        current_step=msg.current_step,
        recent_loss=msg.recent_loss if msg.HasField("recent_loss") else None,
        stages=stages,
        initial_peers=list(msg.initial_peers),
        loss_history=[
            (p.step, p.loss, p.time)
            for p in msg.loss_history
            if math.isfinite(p.loss) and math.isfinite(p.time)
        ],
        history_since=msg.history_since or None,
        model_params=msg.model_params,
        checkpoint_steps=ckpt,
    )
