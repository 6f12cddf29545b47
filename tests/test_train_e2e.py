"""End-to-end runs of `python -m adello_kernels.train` on a tiny fake Fashion-MNIST written in
the real idx format: a 30-step run writes every file; kill -9 mid-run + --resume equals the
uninterrupted run; two torchrun/gloo processes match one process with the same global batch;
bad checkpoints and configurations fail loudly; presets carry the released hyperparameters."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from adello_kernels.train import cli, config, trainer
from adello_kernels.train.models import SyncBatchNorm2d, build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(data, out, steps=30, extra=()):
    return ["--data-root", str(data), "--out", str(out), "--steps", str(steps), "--n1", "20",
            "--gamma-l", "10", "--m1", "30", "--gamma-u", "10", "--batch-size", "8", "--mu", "2",
            "--eval-every", "10", "--log-every", "5", "--eval-batch-size", "64",
            "--threshold", "0.6", "--set", "model_width=4", "--no-progress", "--deterministic",
            "--time-limit", "0", "--set", "base_batch_size=8", *extra]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"      # same threads in every process: bitwise-equal runs
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def _run(args, cwd, launcher=None, **env):
    cmd = [sys.executable, "-m"] + (launcher or []) + ["adello_kernels.train"] + list(args)
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ckpt(run):
    return torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)




@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    """One uninterrupted 30-step deterministic run (subprocess), shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "full"
    r = _run(_args(data_root, out), cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_30_step_run_writes_every_file(full_run):
    out, r = full_run
    for name in ("config.yaml", "metrics.jsonl", "train_log.jsonl", "summary.json", "report.md",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("top1", "balanced_acc", "ece", "mce", "per_class_acc", "prior_kl", "steps",
                "seconds"):
        assert key in summary, key
    assert summary["steps"] == 30 and len(summary["per_class_acc"]) == 10
    assert 0 <= summary["top1"] <= 1 and 0 <= summary["ece"] <= summary["mce"] <= 1
    assert summary["prior_kl"] >= 0 and abs(sum(summary["prior_ulb"]) - 1) < 1e-4
    assert [m["step"] for m in _jsonl(out / "metrics.jsonl")] == [10, 20, 30]
    assert [m["step"] for m in _jsonl(out / "train_log.jsonl")] == list(range(5, 31, 5))
    report = (out / "report.md").read_text()
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert len(pngs) >= 3
    for p in pngs:
        assert f"({p})" in report
        assert (out / p).read_bytes()[:8] == PNG_MAGIC
    for p in ("reliability.png", "per_class_acc.png", "prior.png", "curves.png"):
        assert p in pngs
    assert _ckpt(out)["step"] == 30
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["steps"] == 30 and cfg["algorithm"] == "adello" and cfg["preset"] == "fmnist-lt"
    assert "balanced accuracy" in r.stdout      # the final table


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(full_run, data_root, tmp_path):
    full, _ = full_run
    out = tmp_path / "killed"
    r = _run(_args(data_root, out), cwd=str(tmp_path), **{trainer.KILL_ENV: "25"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert _ckpt(out)["step"] == 20 and not (out / "summary.json").exists()
    r = _run(["--resume", str(out), "--no-progress"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step 20" in r.stdout
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    for key in ("top1", "balanced_acc", "ece", "mce", "per_class_acc", "prior_kl", "prior_ulb",
                "steps"):
        assert a[key] == b[key], key
    strip = lambda recs: [{k: v for k, v in m.items()  # noqa: E731
                           if k != "seconds" and k not in trainer.TIMING_KEYS} for m in recs]
    assert strip(_jsonl(full / "metrics.jsonl")) == strip(_jsonl(out / "metrics.jsonl"))
    assert strip(_jsonl(full / "train_log.jsonl")) == strip(_jsonl(out / "train_log.jsonl"))
    ca, cb = _ckpt(full), _ckpt(out)
    for part in ("model", "ema", "criterion"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(data_root, tmp_path):
    """What K processes guarantee: the same batches, augmentations, mask / pseudo-label
    decisions and prior updates as one process, with sums taken in another order. The weights
    then agree to rounding (about 1e-7 per step here) until a decision near a tie (a
    confidence at tau) flips, after which the two runs drift apart like any two runs with
    different rounding (benchmarks/ddp_equivalence.py: within 1e-5 for 11 steps on this data,
    1.2e-3 after 20, 3e-2 after 40). Six steps stay well inside that horizon."""
    extra = ("--sync-bn",)
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(steps=6, extra=extra)
    # tau 0.2: this tiny model's weak rows fall on both sides, so L_u and L_d both act.
    more = ["--log-every", "1", "--eval-every", "3", "--threshold", "0.2"]
    args1, args2 = _args(data_root, one, **common) + more, _args(data_root, two, **common) + more
    r1 = _run(args1, cwd=str(tmp_path))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(args2, cwd=str(tmp_path), launcher=["torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2", "-m"])
    assert r2.returncode == 0, r2.stderr[-3000:] + r2.stdout[-2000:]
    assert "x 2" in r2.stdout                       # world size 2 in the header line
    log1, log2 = _jsonl(one / "train_log.jsonl"), _jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, 7))
    for a, b in zip(log1, log2):
        for key in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
        assert a["mask_ratio"] == b["mask_ratio"], a["step"]     # the same decisions
        assert a["nonfinite_steps"] == b["nonfinite_steps"] == 0
        assert max(abs(x - y) for x, y in zip(a["prior_ulb"], b["prior_ulb"])) <= 1e-5
    assert any(0 < r["mask_ratio"] < 1 for r in log1)
    c1, c2 = _ckpt(one), _ckpt(two)
    assert c1["world_size"] == 1 and c2["world_size"] == 2
    assert torch.allclose(c1["criterion"]["prior_ulb"], c2["criterion"]["prior_ulb"], atol=1e-5)
    for k, v in c1["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v, c2["model"][k], rtol=0, atol=1e-5), k


# ------------------------------------------------------------------------------------------
# Failures that must be loud
# ------------------------------------------------------------------------------------------

def _copy_run(full, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(full, dst)
    return dst


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(full_run, tmp_path, capsys):
    run = _copy_run(full_run[0], tmp_path)
    ck = run / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])     # truncated write
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    assert "corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_edited_config_does_not_match_the_checkpoint(full_run, tmp_path, capsys):
    run = _copy_run(full_run[0], tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["lr"] = 0.1
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_conflicting_flag_or_without_checkpoint(full_run, tmp_path, capsys):
    run = _copy_run(full_run[0], tmp_path)
    assert cli.main(["--resume", str(run), "--steps", "99"]) == 2
    assert "differs" in capsys.readouterr().err
    # Without a checkpoint (deleted, or the run died before its first evaluation) the run
    # starts again from step 0 with its saved configuration.
    (run / "checkpoints" / "last.pt").unlink()
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert "starting it from step 0" in capsys.readouterr().out
    assert _ckpt(run)["step"] == 30
    assert cli.main(["--resume", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_out_directory_holding_a_run_is_not_overwritten(full_run, capsys):
    assert cli.main(["--out", str(full_run[0])]) == 2
    assert "--resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------

def test_default_is_fmnist_lt_adello_on_cpu_and_flags_override():
    cfg, run_dir, resume = cli.resolve(cli.build_parser().parse_args([]))
    assert (cfg["preset"], cfg["algorithm"], cfg["dataset"], cfg["device"]) == \
        ("fmnist-lt", "adello", "fmnist", "cpu")
    assert run_dir.startswith(os.path.join("runs", "fmnist-lt-adello-")) and not resume
    cfg, _, _ = cli.resolve(cli.build_parser().parse_args(
        ["--algorithm", "fixmatch", "--steps", "7", "--gamma-u", "-100", "--set", "lr=0.1"]))
    assert (cfg["algorithm"], cfg["steps"], cfg["gamma_u"], cfg["lr"]) == \
        ("fixmatch", 7, -100.0, 0.1)
    with pytest.raises(config.ConfigError, match="unknown key"):
        cli.resolve(cli.build_parser().parse_args(["--set", "nope=1"]))


@pytest.mark.parametrize("name", ["cifar10-lt", "cifar100-lt", "stl10-lt", "imagenet127-32",
                                  "imagenet127-64"])
def test_presets_carry_the_spec_hyperparameters(name):
    cfg = config.validate(config.load_preset(name))
    assert (cfg["lr"], cfg["momentum"], cfg["nesterov"], cfg["weight_decay"]) == \
        (0.03, 0.9, True, 5e-4)
    assert (cfg["ema"], cfg["batch_size"], cfg["mu"], cfg["steps"], cfg["eval_every"]) == \
        (0.999, 64, 2, 262144, 1024)
    assert cfg["threshold"] == 0.95 and cfg["prior_momentum"] == 0.999
    assert cfg["model"] == ("resnet50" if name.startswith("imagenet") else "wrn28_2")
    if name.startswith("cifar"):
        assert cfg["distill_start"] == 50000
    if name == "stl10-lt":
        assert cfg["distill_start"] == 0 and cfg["split"] == "stl10"
    if name.startswith("imagenet"):
        assert cfg["image_size"] == int(name[-2:]) and cfg["lb_fraction"] == 0.1


@pytest.mark.parametrize("algo,flexda,distill", [("adello", True, True), ("fixmatch", False, False),
                                                 ("flexda", True, False), ("ccr", False, True)])
def test_algorithm_rows_configure_adello_loss(algo, flexda, distill):
    cfg = config.validate({**config.DEFAULTS, "algorithm": algo, "steps": 100,
                           "distill_start": 5})
    crit = trainer.make_criterion(cfg, torch.full((10,), 0.1))
    assert crit.flexda is flexda
    assert (crit.lambda_d > 0) is distill
    assert (crit.distill_start == 5) is distill
    assert trainer.make_criterion({**cfg, "algorithm": "supervised"}, None) is None


def test_supervised_run(data_root, tmp_path):
    out = tmp_path / "sup"
    assert cli.main(_args(data_root, out, steps=4, extra=("--algorithm", "supervised",
                                                          "--eval-every", "4"))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "supervised" and s["prior_kl"] is None and s["steps"] == 4


def test_em_prior_estimator_run_tracks_the_raw_estimate_beside_it(data_root, tmp_path):
    """--prior-estimator em: ADELLOLoss is built with it, and the log, summary, report and prior
    plot carry the raw estimate beside Q; an unknown value is refused before any work."""
    cfg = config.validate({**config.DEFAULTS, "prior_estimator": "em"})
    assert trainer.make_criterion(cfg, torch.full((10,), 0.1)).prior_estimator == "em"
    with pytest.raises(config.ConfigError, match="--prior-estimator"):
        config.validate({**config.DEFAULTS, "prior_estimator": "EM"})
    out = tmp_path / "em"
    assert cli.main(_args(data_root, out, steps=10, extra=("--prior-estimator", "em"))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["prior_estimator"] == "em" and s["prior_kl_raw"] is not None
    assert abs(sum(s["prior_ulb_raw"]) - 1) < 1e-4 and s["prior_ulb_raw"] != s["prior_ulb"]
    log = _jsonl(out / "train_log.jsonl")
    assert all(len(r["prior_ulb_raw"]) == 10 for r in log)
    assert "raw estimate" in (out / "report.md").read_text()
    assert (out / "prior.png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------

def test_weight_decay_only_on_weights_with_two_or_more_dims():
    m = build_model("wrn28_2", 10, 3, bn_momentum=0.001)
    decay, no_decay = trainer.param_groups(m, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in
                                                              no_decay["params"])
    n = sum(p.numel() for p in m.parameters())
    assert 1.4e6 < n < 1.55e6                      # WRN-28-2: 1.47M parameters


def test_ema_is_a_lerp_of_parameters_and_a_copy_of_buffers():
    m = build_model("cnn", 10, 1, bn_momentum=0.1, width=4)
    ema = trainer.EMA(m, 0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.train()
    m(torch.randn(4, 1, 28, 28))                   # moves the BN running statistics
    ema.update()
    for old, new, live in zip(before, ema.module.parameters(), m.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * live, atol=1e-6)
    for b_ema, b in zip(ema.module.buffers(), m.buffers()):
        assert torch.equal(b_ema, b)


def test_sync_batchnorm_equals_batchnorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(16, 5, 6, 6) * 3 + 1
    ref, ours = torch.nn.BatchNorm2d(5, momentum=0.1), SyncBatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        ref.weight.uniform_()
        ours.weight.copy_(ref.weight)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    ours.eval()
    ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("name,size,c_in", [("cnn", 28, 1), ("wrn28_2", 32, 3),
                                            ("resnet50", 32, 3), ("resnet50", 64, 3)])
def test_models_map_images_to_logits(name, size, c_in):
    m = build_model(name, 7, c_in, bn_momentum=0.1)
    x = torch.randn(2, c_in, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 7)


def test_time_limit_stops_early_and_still_writes_everything(data_root, tmp_path):
    out = tmp_path / "limited"
    args = _args(data_root, out, steps=100000) + ["--time-limit", "0.5", "--eval-every", "50000"]
    assert cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_early"] and 0 < s["steps"] < 100000
    assert _ckpt(out)["step"] == s["steps"]              # resumable from where it stopped
    assert [m["step"] for m in _jsonl(out / "metrics.jsonl")] == [s["steps"]]
