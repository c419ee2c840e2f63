"""Config resolution and every user-error path: one line, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import yaml

from fqtbench.config import load_resolved, parse_set, resolve, save_resolved
from fqtbench.errors import ConfigError


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "bits.w=0"], "bits.w=0"),
        (["--set", "bits.w=33"], "bits.w=33"),
        (["--set", "trainer.max_epochs=-1"], "trainer.max_epochs=-1"),
        (["--set", "bits.x=3"], "unknown key 'bits.x'"),
        (["--set", "bits.w=abc"], "bits.w='abc'"),
        (["--set", "optim.name=lamb"], "optim.name='lamb'"),
        (["--set", "qat.nope=1"], "unknown key 'qat.nope'"),
        (["--set", "engine.backend=gpu9"], "engine.backend='gpu9'"),
        (["--set", "data.name=mnist"], "data.name='mnist'"),
        (["--set", "bitsw"], "expected key=value"),
        (["--track", "imagenet-9"], "track='imagenet-9'"),
        (["--wandb", "sometimes"], "--wandb='sometimes'"),
        (["--config", "/nonexistent/cfg.yaml"], "/nonexistent/cfg.yaml"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(cli, tmp_path, args, needle):
    code, out, err = cli("run", "--method", "qat", "--out", str(tmp_path), *args)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_error_names_allowed_values(cli):
    code, _, err = cli("run", "--method", "nope")
    assert code == 2 and "unknown method 'nope'" in err and "qat" in err and "fp32" in err
    code, _, err = cli("run", "--method", "qat", "--set", "engine.backend=gpu9")
    assert "int8" in err and "reference" in err
    code, _, err = cli("run", "--method", "qat", "--set", "bits.x=1")
    assert "allowed keys here:" in err and " w" in err
    code, _, err = cli("run", "--method", "qat", "--set", "bits.w=33")
    assert "less than or equal to 32" in err


def test_invalid_yaml_file(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: [w: 3\n")
    code, _, err = cli("run", "--method", "qat", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_unknown_command_and_list_kind(cli):
    code, _, err = cli("list", "gadgets")
    assert code == 2 and "methods" in err
    code, _, err = cli("frobnicate")
    assert code == 2


def test_precedence_defaults_track_method_file_set(tmp_path):
    base = resolve("qat")
    assert base.track == "digits" and base.data.name == "digits" and base.trainer.max_epochs == 30  # track file
    assert base.params.weight_granularity == "tensor"  # method defaults file
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"trainer": {"max_epochs": 7}, "bits": {"w": 5}, "qat": {"weight_granularity": "channel"}}))
    cfg = resolve("qat", config_file=f)
    assert cfg.trainer.max_epochs == 7 and cfg.bits.w == 5 and cfg.params.weight_granularity == "channel"
    cfg = resolve("qat", config_file=f, overrides=["trainer.max_epochs=9", "qat.weight_granularity=tensor"], seed=4)
    assert cfg.trainer.max_epochs == 9 and cfg.bits.w == 5 and cfg.params.weight_granularity == "tensor" and cfg.seed == 4
    assert cfg.optim.lr == 0.05  # from the track, untouched


def test_set_values_are_typed():
    assert parse_set(["a.b=3", "a.c=true", "d=[1, 2]", "e=x"]) == {"a": {"b": 3, "c": True}, "d": [1, 2], "e": "x"}
    with pytest.raises(ConfigError):
        parse_set(["a..b=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve("qat", overrides=["bits.w=4", "qat.weight_granularity=channel"], seed=3)
    save_resolved(cfg, tmp_path / "config.yaml")
    again = load_resolved(tmp_path / "config.yaml")
    assert again.as_dict() == cfg.as_dict()
    assert again.identity_hash() == cfg.identity_hash()
    assert resolve("qat", overrides=["bits.w=5"]).identity_hash() != cfg.identity_hash()
    assert resolve("qat", overrides=["bits.w=4", "qat.weight_granularity=channel", "out=elsewhere"], seed=3).identity_hash() == cfg.identity_hash()


def test_method_specific_bits_checks():
    with pytest.raises(ConfigError, match="fqt"):
        resolve("qat", overrides=["bits.g_input=4"])
    with pytest.raises(ConfigError, match="exec"):
        resolve("fp32", overrides=["exec=int"])


def test_pretraining_cache_key_ignores_the_engine_but_not_the_training():
    """A new or changed engine option scores networks differently but trains the same fp32 one."""
    from fqtbench.harness.pretrain import fp32_config, pretraining_key

    base = pretraining_key(fp32_config(resolve("ccea", seed=1)))
    assert pretraining_key(fp32_config(resolve("ccea", overrides=["engine.act_ranges=calibrate", "engine.calib_batches=2"], seed=1))) == base
    assert pretraining_key(fp32_config(resolve("ccea", seed=2))) != base
    assert pretraining_key(fp32_config(resolve("ccea", overrides=["data.train_subset=500"], seed=1))) != base
