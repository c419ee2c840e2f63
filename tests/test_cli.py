"""The CLI end to end on the digits track, and its listing and help output."""

from __future__ import annotations

import pytest

from tests.conftest import only_record


@pytest.mark.parametrize(
    "kind, names",
    [
        ("methods", ["fp32", "qat"]),
        ("models", ["mlp", "cnn-s", "resnet20", "resnet32", "resnet56", "resnet18"]),
        ("datasets", ["digits", "cifar10", "imagefolder"]),
        ("backends", ["reference", "int8", "bitserial"]),
        ("tracks", ["digits", "cifar10-r20-cpu", "cifar10-r20"]),
    ],
)
def test_list(cli, kind, names, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli("list", kind)
    assert code == 0, err
    for n in names:
        assert n in out
    if kind != "tracks":
        assert "fqtbench" in out  # the distribution column


@pytest.mark.parametrize("cmd, needles", [
    (["run"], ["--method", "--track", "--set", "--seed", "--out", "--wandb", "--config", "--resume", "Precedence"]),
    (["list"], ["methods", "backends", "tracks"]),
    (["new-method"], ["NAME", "--dir"]),
    ([], ["run", "list", "new-method"]),
])
def test_help_is_useful(cli, cmd, needles):
    code, out, err = cli(*cmd, "--help")
    assert code == 0
    for n in needles:
        assert n in out


@pytest.mark.parametrize("method, bits, bar", [("fp32", None, 97.0), ("qat", 8, 97.0), ("qat", 4, 96.0)])
def test_run_on_digits_learns(cli, tmp_path, method, bits, bar):
    """A method is done when it learns: the issue's digits bars, on seed 0."""
    args = ["run", "--method", method, "--out", str(tmp_path)]
    if bits:
        args += ["--set", f"bits.w={bits}", "--set", f"bits.a={bits}"]
    code, out, err = cli(*args)
    assert code == 0, err
    rec = only_record(tmp_path)
    final = rec.metrics["final"]
    assert final["sim_top1"] >= bar
    if method == "fp32":
        assert final["int_top1"] is None and final["ptq_int_top1"] >= bar - 1.0
    else:
        assert final["int_top1"] >= bar
        assert abs(final["gap"]) <= (0.5 if bits == 8 else 1.0)
    assert "summary" in out
    path = next(tmp_path.glob("*/record.json"))
    assert f"record: {path}" in out.splitlines()  # whole, on one line: it can be copied


def test_a_mistaken_resume_is_refused_before_it_touches_the_run(cli, tmp_path):
    """Resuming with another method, a finished run, options that would be ignored, or a folder that
    is not a run: one line, exit 2, and the run's files byte for byte as they were."""
    code, _, err = cli("run", "--method", "qat", "--out", str(tmp_path), "--set", "trainer.max_epochs=1")
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    stray = tmp_path.parent / "not-a-run"
    stray.mkdir()
    (stray / "config.yaml").write_bytes(before["config.yaml"])
    for args, needle in [
        (["--method", "fp32", "--resume", str(run_dir)], "holds a qat run, not fp32: resume it with --method qat"),
        (["--method", "qat", "--resume", str(run_dir)], "already finished (status ok)"),
        (["--method", "qat", "--resume", str(run_dir), "--set", "trainer.max_epochs=3", "--seed", "2"],
         "would be ignored: --set trainer.max_epochs=3, --seed 2"),
        (["--method", "qat", "--resume", str(stray)], "no record.json inside"),
    ]:
        code, _, err = cli("run", *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before

    old_version = tmp_path.parent / "old-version"  # an interrupted run of an earlier qat version
    old_version.mkdir()
    (old_version / "config.yaml").write_bytes(before["config.yaml"])
    (old_version / "record.json").write_text(before["record.json"].decode()
                                               .replace('"qat@1"', '"qat@0"').replace('"status": "ok"', '"status": "interrupted"'))
    code, _, err = cli("run", "--method", "qat", "--resume", str(old_version))
    assert code == 2 and "holds a qat@0 run, but the installed method is qat@1" in err, err


@pytest.mark.parametrize("sets, needle", [
    (["method=ccea"], "method='ccea' in --set: the method is chosen by --method"),
    (["ccea.pop_size=8"], "ccea.*: options of the ccea method, but this run's method is qat"),
    (["bits.w=1"], "bits.w=1: symmetric weight codes need at least 2 bits"),
    (["bits.w=12"], "bits.w=12: qat exports to the shared integer engine, which evaluates at most 8-bit"),
    (["bits.a=9"], "bits.a=9: qat exports"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.strategy=foo"], "trainer.strategy='foo': unknown"),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy='ddp_spawn': spawned processes cannot hand back"),
])
def test_config_mistakes_are_refused_before_the_run(cli, tmp_path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    code, _, err = cli("run", "--method", "qat", "--out", str(tmp_path), *args)
    assert code == 2 and needle in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_records_get_the_mode_the_umask_gives(tmp_path):
    """Atomic writes go through mkstemp (owner-only); the record must be as readable as any file."""
    import os

    from fqtbench.records import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


def test_a_model_option_the_model_rejects_is_named(cli, tmp_path):
    code, _, err = cli("run", "--method", "qat", "--out", str(tmp_path), "--set", "model.name=mlp",
                       "--set", "model.options.hidden=[abc]")
    assert code == 2 and "model.options={'hidden': ['abc']} for model 'mlp'" in err, err
    assert only_record(tmp_path).status.startswith("failed: model.options=")  # the failed run says why


def test_reevaluate_scores_a_finished_run_again_and_keeps_the_previous_scores(cli, tmp_path):
    """Same engine, same checkpoint: the same metrics; the previous ones are kept; nothing trains."""
    import json

    code, _, err = cli("run", "--method", "qat", "--out", str(tmp_path), "--set", "bits.w=4", "--set", "bits.a=4",
                       "--set", "trainer.max_epochs=2", "--set", "trainer.progress=false")
    assert code == 0, err
    run_dir = next(tmp_path.iterdir())
    before = json.loads((run_dir / "record.json").read_text())
    ckpts = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    code, out, err = cli("reevaluate", str(run_dir))
    assert code == 0, err
    after = json.loads((run_dir / "record.json").read_text())
    assert after["metrics"] == before["metrics"] and after["layers"] == before["layers"]
    assert after["training_cost"] == before["training_cost"]  # nothing trained
    assert [r["metrics"] for r in after["extra"]["reevaluations"]] == [before["metrics"]]
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == ckpts
    assert f"{before['metrics']['final']['int_top1']:.2f} -> {after['metrics']['final']['int_top1']:.2f}" in err
    assert after["config_hash"] == before["config_hash"] and after["config"] == before["config"]

    # A run made before a config key existed: re-scoring fills in the default that scored it, and the
    # record's identity follows, so a suite sees the run as done and a leaderboard counts it once.
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["engine"]["act_ranges"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    del after["config"]["engine"]["act_ranges"]
    after["config_hash"] = "0123456789abcdef"
    (run_dir / "record.json").write_text(json.dumps(after))
    code, _, err = cli("reevaluate", str(run_dir))
    assert code == 0, err
    again = json.loads((run_dir / "record.json").read_text())
    assert again["config_hash"] == before["config_hash"] and again["config"]["engine"]["act_ranges"] == "trained"
    assert "act_ranges: trained" in (run_dir / "config.yaml").read_text()
    assert again["extra"]["reevaluations"][-1]["config_hash"] == "0123456789abcdef"
    after = again

    after["status"] = "interrupted"
    (run_dir / "record.json").write_text(json.dumps(after))
    code, _, err = cli("reevaluate", str(run_dir))
    assert code == 2 and "status 'interrupted'; only finished (ok) runs" in err and "1 of 1 runs not re-evaluated" in err
    code, _, err = cli("reevaluate", str(tmp_path), str(run_dir))  # a refusal does not stop the others
    assert code == 2 and "not a run folder" in err and "status 'interrupted'" in err and "2 of 2 runs" in err


@pytest.mark.parametrize("method, sets", [
    ("bsq", ["bsq.finetune_epochs=0", "bsq.requant_every=5", "bsq.alpha=0.5"]),  # its one re-quantization is at the end
    ("ebs", ["ebs.search_fraction=1.0"]),  # the budget ends inside the search: decided at the end
])
def test_reevaluate_finishes_a_run_that_ended_mid_phase_as_the_run_did(cli, tmp_path, method, sets):
    """The end-of-training step (on_train_end) is part of what the run scored; a restored, spent
    run skips Lightning's fit loop, so reevaluate must take that step itself."""
    import json

    args = [a for s in ["trainer.max_epochs=3", "trainer.progress=false", *sets] for a in ("--set", s)]
    code, _, err = cli("run", "--method", method, "--out", str(tmp_path), *args)
    assert code == 0, err
    run_dir = next(tmp_path.iterdir())
    before = json.loads((run_dir / "record.json").read_text())
    code, _, err = cli("reevaluate", str(run_dir))
    assert code == 0, err
    after = json.loads((run_dir / "record.json").read_text())
    assert after["layers"] == before["layers"] and after["metrics"]["final"] == before["metrics"]["final"]
