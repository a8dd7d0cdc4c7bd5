"""The CLI explains itself: every command's --help, a mistyped option, --version, and the
messages of a config that cannot run (each names the file and line, the setting, its flag and a
real environment variable).

Commands are discovered from the argparse parser, so a new command is checked without being
listed here.
"""

from __future__ import annotations

import argparse
import re

import pytest

from node.config import TRAIN_FLAGS, TrainConfig
from node.node_config import NodeConfig
from node.settings import ConfigError, load_settings, settings_of
from node.version import VERSION
from resbm.cli import build_parser, main

pytestmark = pytest.mark.unit

# an argparse metavar made from a dotted dest (MODEL.N_STAGES, SECURITY.TOKEN_FILE)
DOTTED_PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]*\.[A-Z0-9_.]*[A-Z0-9_]\b")


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("resbm",)
) -> dict[str, argparse.ArgumentParser]:
    """Every command and subcommand, by its words ("resbm config show join")."""
    out = {" ".join(path): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(commands(sub, (*path, name)))
    return out


COMMANDS = commands(build_parser())


def test_the_walk_finds_nested_commands():
    for command in ("resbm bench gap", "resbm data prepare", "resbm config show join"):
        assert command in COMMANDS
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_plain_placeholders(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split()[1:], "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {command}")
    assert not DOTTED_PLACEHOLDER.findall(out), f"`{command} --help` shows internal names"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_a_help_text(command):
    """Options and positionals alike (help=argparse.SUPPRESS is a choice, not a gap)."""
    missing = {
        (a.option_strings or [a.dest])[-1]
        for a in COMMANDS[command]._actions
        if a.help is None and not isinstance(a, argparse._SubParsersAction)
    }
    assert not missing, f"`{command}`: options without help: {sorted(missing)}"


def test_status_and_sample_state_their_defaults(capsys):
    for command, expect in [
        ("status", ["(default 10)"]),
        ("sample", ["(default 300)", "(default 0.8)", "(default 40)", "(default auto)"]),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(e in out for e in expect), (command, out)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"resbm {VERSION}\n"


@pytest.mark.parametrize(
    "argv,extras,hint",
    [
        (["train", "--stepz", "3"], "--stepz 3", "--stepz: did you mean --steps?"),
        (["bench", "gap", "--dryrun"], "--dryrun", "--dryrun: did you mean --dry-run?"),
        (["config", "show", "join", "--state_dir=x"], "--state_dir=x", "did you mean --state-dir?"),
    ],
)
def test_a_mistyped_option_gets_the_commands_usage_and_a_suggestion(argv, extras, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    command = " ".join(["resbm", *argv[: len(argv) - len(extras.split())]])
    assert err.startswith(f"usage: {command} [-h]")  # the command's usage, not the top level's
    assert f"{command}: error: unrecognized arguments: {extras}" in err
    assert hint in err


def test_a_stray_word_is_refused_without_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--steps", "3", "oops"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: resbm train " in err and "unrecognized arguments: oops" in err
    assert "did you mean" not in err


# ---- config errors ------------------------------------------------------------------------------
def run_config_show(argv: list[str], capsys) -> str:
    assert main(["config", "show", *argv]) == 2
    return capsys.readouterr().err


def test_a_typo_in_the_config_file_names_file_line_and_nearest_setting(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text("steps = 7\nstepz = 7\n[model]\nd_modle = 64\n")
    err = run_config_show(["train", "--config", str(f)], capsys)
    assert f"unknown setting 'stepz' in {f}, line 2: did you mean 'steps' (--steps)?" in err
    assert f"unknown setting 'model.d_modle' in {f}, line 4: did you mean 'model.d_model'" in err
    assert "Extra inputs are not permitted" not in err


def test_a_setting_in_the_wrong_table_points_to_the_right_one(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("d_model = 64\n")
    with pytest.raises(ConfigError, match=r"'d_model' in .*line 1: did you mean 'model.d_model'"):
        load_settings(TrainConfig, {}, f, {d: flag for d, (flag, _) in TRAIN_FLAGS.items()})


def test_a_bad_value_in_the_file_names_where_it_was_set(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text("[optim]\nlr = -1.0\n")
    err = run_config_show(["train", "--config", str(f)], capsys)
    assert "setting 'optim.lr' (--lr, RESBM_OPTIM__LR)" in err
    assert f"(set in {f}, line 2)" in err


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text("steps = 7\nseed = = 5\n")
    err = run_config_show(["train", "--config", str(f)], capsys)
    assert f"config file {f} is not valid TOML: line 2, column 8: Invalid value" in err
    assert "seed = = 5" in err  # the line itself, with a caret under column 8
    assert err.splitlines()[-1].index("^") == err.splitlines()[-2].index("seed") + 7


def test_a_model_error_names_the_flags_and_real_env_vars(capsys):
    err = run_config_show(["train", "--n-heads", "3"], capsys)
    assert "must be divisible by n_heads" in err
    assert "'model.d_model' (--d-model, RESBM_MODEL__D_MODEL)" in err
    assert "'model.n_heads' (--n-heads, RESBM_MODEL__N_HEADS)" in err
    assert not re.search(r"RESBM_MODEL\b", err)  # pydantic-settings reads no such variable


def test_a_whole_config_error_names_the_flags(capsys):
    assert main(["simulate", "--link", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "setting 'link' (--link, RESBM_LINK): --link 'bogus'" in err
    assert "(whole config)" not in err

    assert main(["simulate", "--sever", "3s"]) == 2
    err = capsys.readouterr().err
    assert "'sever' (--sever" in err and "'link' (--link" in err

    err = run_config_show(["coordinator", "--stages", "1"], capsys)
    assert "setting 'model.n_stages' (--stages, RESBM_MODEL__N_STAGES): a swarm needs" in err
    assert "'swarm'" not in err  # a plain word in prose is not a setting


def test_env_vars_in_messages_are_ones_pydantic_settings_reads(monkeypatch):
    """Every RESBM_* name a message prints, set to a good value, is read (here: fixes it)."""
    monkeypatch.setenv("RESBM_MODEL__N_HEADS", "3")
    with pytest.raises(ConfigError) as err:
        load_settings(TrainConfig, {}, None, {d: f for d, (f, _) in TRAIN_FLAGS.items()})
    named = set(re.findall(r"RESBM_\w+", str(err.value)))
    assert "RESBM_MODEL__N_HEADS" in named
    readable = {
        "RESBM_" + d.replace(".", "__").upper()
        for d, table in settings_of(TrainConfig).items()
        if not table
    }
    assert named <= readable
    monkeypatch.setenv("RESBM_MODEL__N_HEADS", "4")
    assert load_settings(TrainConfig).model.n_heads == 4


def test_an_unknown_nested_env_var_is_named(monkeypatch):
    monkeypatch.setenv("RESBM_MODEL__D_MODLE", "64")
    with pytest.raises(ConfigError, match=r"'model\.d_modle' from RESBM_MODEL__D_MODLE: did you"):
        load_settings(TrainConfig)


# ---- config show ------------------------------------------------------------------------------
def test_config_show_hides_test_only_settings_and_the_joiners_stage(capsys):
    assert main(["config", "show", "node"]) == 0
    node = capsys.readouterr().out
    assert "\nstage = 0\n" in node and "fail_" not in node
    assert main(["config", "show", "join", "--coordinator", "127.0.0.1:9"]) == 0
    join = capsys.readouterr().out
    assert not re.search(r"^stage =", join, re.M) and "fail_" not in join
    assert "wanted_stage" in join  # what the user may ask for is still shown


def test_hidden_settings_still_work_for_launchers(tmp_path):
    f = tmp_path / "node.json"  # what the launcher hands a node
    f.write_text('{"fail_at_step": 3, "fail_phase": "garbage", "stage": 1}')
    cfg = load_settings(NodeConfig, file=f)
    assert (cfg.fail_at_step, cfg.fail_phase, cfg.stage) == (3, "garbage", 1)
