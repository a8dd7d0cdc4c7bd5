"""Operational settings shared by every long-running process (node, join, coordinator):
security, per-peer limits, logging and metrics endpoints. Torch-, gRPC- and hivemind-free.

These never enter the swarm's manifest: two nodes of one swarm may differ in all of them (one
behind NAT, one with a metrics port), except the token, which is the swarm's shared secret.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}$")
MIN_TOKEN_CHARS = 16


def check_host_port(v: str | None, allow_zero: bool = True) -> str | None:
    if v is None:
        return v
    if not HOST_PORT.match(v):
        raise ValueError(f"{v!r} is not HOST:PORT")
    port = int(v.rsplit(":", 1)[1])
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"{v!r}: port {port} out of range")
    return v


class SecurityConfig(BaseModel):
    """A private swarm: a shared access token on every RPC and DHT record, and optional TLS.

    The token can come from a file (`token_file`, e.g. a systemd credential) so it never shows
    in `ps` or shell history; `token` (or RESBM_SECURITY__TOKEN) also works.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # never echo a token

    token: SecretStr | None = Field(None, description="swarm access token (16+ characters)")
    token_file: Path | None = Field(None, description="file whose first line is the token")
    tls_cert: Path | None = Field(None, description="PEM certificate of this process")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(None, description="PEM CA that signed the swarm's certificates")

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token must have at least {MIN_TOKEN_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> SecurityConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give the token once: token or token_file, not both")
        if self.token_file is not None:
            if not self.token_file.is_file():
                raise ValueError(f"token_file {self.token_file} does not exist")
            text = self.token_file.read_text().strip().splitlines()
            self.token = SecretStr(text[0].strip() if text else "")
            self.token_file = None
            if len(self.token.get_secret_value()) < MIN_TOKEN_CHARS:
                raise ValueError(f"the token in token_file must have {MIN_TOKEN_CHARS}+ characters")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} does not exist (make one with `resbm certs`)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("TLS needs tls_ca too: peers are verified against the swarm's CA")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def token_value(self) -> str | None:
        return None if self.token is None else self.token.get_secret_value()


class PeerLimits(BaseModel):
    """What one neighbour may cost this node (node/guard.py). Rate and in-flight limits hold a
    fast peer back (nothing is refused); garbage bans it at once."""

    model_config = ConfigDict(extra="forbid")

    rate_per_s: float = Field(1000.0, gt=0, description="messages a second read from one peer")
    burst: int = Field(2000, ge=1, description="messages one peer may send at once")
    max_in_flight: int = Field(
        64, ge=1, description="messages of one peer waiting for this node (at least 4 x M + 16)"
    )
    decode_cpu_share: float = Field(
        1.0,
        gt=0,
        description="seconds a second this node spends decoding one peer's messages (of its two "
        "decode threads); past it, that peer is read slower",
    )
    outlier_factor: float = Field(
        1000.0, gt=1, description="ban a peer whose tensor RMS exceeds this x its recent median"
    )
    outlier_window: int = Field(64, ge=4, description="recent tensors the median is taken over")
    outlier_after: int = Field(16, ge=1, description="tensors seen before outliers are judged")
    ban_s: float = Field(300.0, gt=0, description="how long a banned peer stays refused")
    max_refused: int = Field(
        256,
        ge=16,
        description="refusals of honest-looking messages (a wrong step, a race) one peer may "
        "cause in a minute; past it, a ban (each is decoded first: a flood of them took the "
        "event loop)",
    )
    # memory: every link holds buffers, so links are capped, handshakes included (#10 H5)
    max_links: int = Field(128, ge=2, description="links (and handshakes) this node holds")
    max_links_per_host: int = Field(
        32, ge=1, description="links (and handshakes) from one IP address (a NAT counts as one)"
    )
    max_outbox_mb: float = Field(
        256.0, gt=0, description="MB queued for one peer that does not read: then its link closes"
    )
    max_inbox_mb: float = Field(
        256.0,
        gt=0,
        description="MB of received messages waiting for the node's worker, all peers together: "
        "past it, a peer with a message waiting is read no further until there is room",
    )
    max_held_mb: float = Field(
        256.0,
        gt=0,
        description="MB of peers' tensors held for the next step (early messages) and for "
        "recovering a dead replica's work (adoptions): past it, more are refused",
    )


class OpsConfig(BaseModel):
    """Logging and metrics of one process."""

    model_config = ConfigDict(extra="forbid")

    log_file: Path | None = Field(None, description="also append the log here (rotated)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    metrics_listen: str | None = Field(
        None, description="HOST:PORT of the Prometheus /metrics endpoint; unset = off"
    )

    @field_validator("metrics_listen")
    @classmethod
    def _hp(cls, v: str | None) -> str | None:
        return check_host_port(v)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log level {v!r}: use DEBUG, INFO, WARNING or ERROR")
        return v.upper()


SECURITY_FLAGS: dict[str, tuple[str, dict]] = {
    "security.token_file": (
        "token-file",
        {"metavar": "PATH", "help": "file holding the swarm access token (default: none)"},
    ),
    "security.tls_cert": (
        "tls-cert",
        {"metavar": "PATH", "help": "PEM certificate (see `resbm certs`; default: no TLS)"},
    ),
    "security.tls_key": ("tls-key", {"metavar": "PATH", "help": "PEM private key of --tls-cert"}),
    "security.tls_ca": ("tls-ca", {"metavar": "PATH", "help": "PEM CA certificate of the swarm"}),
}

OPS_FLAGS: dict[str, tuple[str, dict]] = {
    "ops.log_file": ("log-file", {"metavar": "PATH", "help": "also log to this file"}),
    "ops.log_level": (
        "log-level",
        {"metavar": "LEVEL", "help": "DEBUG, INFO, WARNING, ERROR (default INFO)"},
    ),
    "ops.metrics_listen": (
        "metrics-listen",
        {"metavar": "HOST:PORT", "help": "serve Prometheus /metrics here (default: off)"},
    ),
}


def check_coordinator(value: str) -> str:
    """A coordinator's address must be HOST:PORT with a real port. Checked when the arguments
    (or the config) are read, so a mistyped address is a configuration error (exit 2, which
    service managers do not restart), not a failed join that is retried forever."""
    try:
        return check_host_port(value, allow_zero=False) or value
    except ValueError as err:
        if ":" not in value.rsplit("]", 1)[-1]:
            why = " (no port)"
        elif "out of range" in str(err):
            why = f" ({str(err).rsplit(': ', 1)[-1]})"
        else:
            why = ""
        raise ValueError(
            f"{value!r} is not HOST:PORT{why}: give the coordinator's address and gRPC port, "
            "e.g. --coordinator 203.0.113.7:7100"
        ) from None


MULTIADDR = re.compile(r"^(/[A-Za-z0-9._~:%\-]+)+$")  # a light check; hivemind parses it properly


def check_multiaddrs(addrs: list[str]) -> list[str]:
    """DHT addresses (--initial-peers, --dht-listen) must look like multiaddrs: hivemind's own
    parse of a bad one fails deep in p2pd's start, as a traceback."""
    for addr in addrs:
        if not MULTIADDR.match(addr):
            raise ValueError(f"{addr!r} is not a multiaddr (like /ip4/1.2.3.4/tcp/31337)")
    return addrs
