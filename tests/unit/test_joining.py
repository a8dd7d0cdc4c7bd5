"""`resbm join` and `resbm config show`, without processes: the manifest decides the training
settings, a version or corpus mismatch is refused with what to do, the node id persists, and
`config show` prints a config file that loads back to the same config (without the token)."""

from __future__ import annotations

import json

import pytest

from node.data import Corpus
from node.joining import JoinConfig, JoinError, apply_manifest, local_defaults
from node.node_config import NodeConfig
from node.settings import ConfigError, load_settings
from node.swarm.manifest import manifest_for
from resbm.cli import main
from resbm.config_show import public_dump, to_toml

pytestmark = pytest.mark.unit

MODEL = {"d_model": 64, "n_heads": 2, "n_layers": 3, "n_stages": 3, "seq_len": 16}


def swarm_manifest(**over):
    cfg = NodeConfig(model={**MODEL, "compression": 16}, steps=77, batch_size=3, microbatches=5)
    m = manifest_for(cfg, Corpus.fingerprint_of(None), "demo")
    return m.model_copy(update=over)


def joiner(tmp_path, **over) -> JoinConfig:
    return JoinConfig(coordinator="127.0.0.1:9", state_dir=tmp_path, **over)


def test_the_manifest_decides_the_training_settings(tmp_path):
    cfg = apply_manifest(joiner(tmp_path), swarm_manifest())
    assert cfg.swarm == "demo" and cfg.steps == 77 and cfg.microbatches == 5
    assert cfg.model.d_model == 64 and cfg.model.n_stages == 3 and cfg.batch_size == 3
    assert cfg.optim.total_steps == 77  # the swarm's schedule, not one derived from our default
    # what the joiner would announce is exactly the swarm's manifest
    assert manifest_for(cfg, Corpus.fingerprint_of(None), "demo") == swarm_manifest()


def test_an_explicit_setting_is_kept_for_the_manifest_check_to_refuse(tmp_path):
    cfg = apply_manifest(joiner(tmp_path, batch_size=9), swarm_manifest())
    assert cfg.batch_size == 9 and cfg.microbatches == 5  # ours is kept; the rest is the swarm's
    from node.swarm.manifest import ManifestMismatch, check_manifest

    ours = manifest_for(cfg, Corpus.fingerprint_of(None), "demo")
    with pytest.raises(ManifestMismatch, match="batch_size: swarm 3, yours 9"):
        check_manifest(swarm_manifest(), ours)


def test_another_version_or_corpus_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(JoinError, match=r"install resbm 9\.1\.0"):
        apply_manifest(joiner(tmp_path), swarm_manifest(version="9.1.0"))
    text = tmp_path / "other.txt"
    text.write_text("not shakespeare " * 500)
    with pytest.raises(JoinError, match="pass --data with the swarm's data"):
        apply_manifest(joiner(tmp_path, data=text), swarm_manifest())


def test_the_node_id_and_state_paths_persist_across_restarts(tmp_path):
    first = local_defaults(apply_manifest(joiner(tmp_path), swarm_manifest()))
    again = local_defaults(apply_manifest(joiner(tmp_path), swarm_manifest()))
    assert first.node_id == again.node_id and first.node_id.startswith("n-")
    assert first.checkpoint_dir == tmp_path / "demo" / "checkpoints"
    assert first.ops.log_file == tmp_path / "demo" / "node.log"


def test_join_needs_a_way_to_find_the_swarm():
    with pytest.raises(ValueError, match="--initial-peers MULTIADDR"):
        JoinConfig()
    with pytest.raises(ValueError, match="swarm id"):
        JoinConfig(initial_peers=["/ip4/1.2.3.4/tcp/5"])
    JoinConfig(coordinator="h:1")  # the coordinator names the swarm


def test_config_show_round_trips_and_never_prints_the_token(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESBM_SECURITY__TOKEN", "s3cret-token-0123456789")
    argv = ["config", "show", "node", "--stage", "1", "--d-model", "64", "--n-heads", "2"]
    argv += ["--compression", "16", "--listen", "0.0.0.0:7000", "--no-reachable", "--swarm", "x"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "s3cret" not in text and "reachable = false" in text
    path = tmp_path / "node.toml"
    path.write_text(text)
    monkeypatch.delenv("RESBM_SECURITY__TOKEN")
    loaded = load_settings(NodeConfig, file=path)
    assert loaded.stage == 1 and loaded.model.d_model == 64 and loaded.listen == "0.0.0.0:7000"
    assert public_dump(loaded) == json.loads(json.dumps(public_dump(loaded)))
    assert to_toml(public_dump(loaded)) in text  # what was printed is that config


def test_config_show_names_a_bad_setting(capsys):
    assert main(["config", "show", "coordinator", "--http-listen", "nowhere"]) == 2
    assert "http_listen" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_settings(NodeConfig, {"limits.ban_s": -1})


@pytest.mark.parametrize("command", ["join", "status"])
@pytest.mark.parametrize("address", ["127.0.0.1", "coordinator.example.org", "10.0.0.1:0"])
def test_a_coordinator_address_without_a_port_is_a_usage_error(command, address, capsys):
    """Found by hand: `resbm join --coordinator 127.0.0.1` failed in the join and exited 75
    ("try later"), so systemd and Docker restarted it forever. It is a usage error: exit 2."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--coordinator", address])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --coordinator" in err and f"{address!r}" in err
    assert "HOST:PORT" in err and "--coordinator 203.0.113.7:7100" in err


def test_a_coordinator_address_from_the_environment_is_checked_too(monkeypatch, capsys):
    monkeypatch.setenv("RESBM_COORDINATOR", "127.0.0.1")
    assert main(["join"]) == 2  # a config error, before anything is started
    err = capsys.readouterr().err
    assert "--coordinator" in err and "RESBM_COORDINATOR" in err and "is not HOST:PORT" in err


def test_a_fixed_pipeline_node_without_next_is_refused(capsys):
    """Found by hand: `resbm node` alone became stage 0 of a pipeline with nobody else and
    logged "paused" every 30 s forever."""
    assert main(["node", "--stage", "0"]) == 2
    err = capsys.readouterr().err
    assert "stage 0 of a fixed pipeline dials the next stage: give --next HOST:PORT" in err
