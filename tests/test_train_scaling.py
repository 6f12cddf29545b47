"""The batch-size scaling rules (adello_kernels/train/scaling.py): kappa = 1 gives every preset's
values back exactly, kappa = 8 gives the same run as a function of the samples seen (each rule
checked against what B0 steps would have done), the warm-up / sqrt / cosine lr shapes, and
inconsistent flags refused with an error naming the flag. Then the driver (fast_step.py):
accumulated steps equal whole-batch steps, a scaled run resumes exactly and saves its resolved
values, the compiled step has no graph break and matches the eager one, --dataset synthetic
and the throughput fields."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from adello_kernels import alpha_schedule
from adello_kernels.train import cli, config, scaling, trainer


def _cfg(preset="fmnist-lt", **kw):
    cfg = config.load_preset(preset)
    cfg.update(kw)
    return config.validate(cfg)


@pytest.mark.parametrize("preset", config.preset_names())
def test_kappa_1_without_warmup_is_exactly_the_preset(preset):
    # Guards against a rule that is not the identity at kappa = 1 (e.g. 1 - (1 - 0.1) is
    # 0.09999999999999998, not 0.1): the released recipes must run unchanged.
    cfg = _cfg(preset)
    cfg.update(batch_size=cfg["base_batch_size"], warmup=0, cosine=False, grad_accum=1)
    s = scaling.resolve(cfg)
    assert s.kappa == 1
    assert scaling.apply(cfg, s) == cfg
    for key in scaling.SCALED_KEYS:
        assert getattr(s, key) == cfg[key] and type(getattr(s, key)) is type(cfg[key]), key
    assert s.lr_constant and {s.lr_at(t) for t in (0, 1, s.steps // 2, s.steps - 1)} == {cfg["lr"]}


def test_kappa_8_values_of_every_rule():
    cfg = _cfg(batch_size=512)              # fmnist-lt: 800 steps, lr 0.03, EMA 0.99, BN 0.01
    s = scaling.resolve(cfg)
    assert s.kappa == 8
    assert (s.steps, s.distill_start, s.eval_every, s.log_every) == (100, 0, 13, 3)
    assert s.lr == pytest.approx(0.24, rel=1e-12)
    assert s.ema == pytest.approx(math.exp(8 * math.log(0.99)), rel=1e-12)
    assert s.prior_momentum == pytest.approx(math.exp(8 * math.log(0.99)), rel=1e-12)
    assert s.bn_momentum == pytest.approx(1 - math.exp(8 * math.log(0.99)), rel=1e-12)
    cif = scaling.resolve(_cfg("cifar10-lt", batch_size=512))
    assert (cif.steps, cif.distill_start, cif.eval_every, cif.log_every) == (32768, 6250, 128, 32)
    assert cif.bn_momentum == pytest.approx(1 - 0.999 ** 8, rel=1e-12)


@pytest.mark.parametrize("kappa", [0.5, 2, 8, 16])
def test_every_average_forgets_the_same_amount_per_sample(kappa):
    # The point of rho -> rho^kappa: after S samples, an EMA at batch B keeps exactly the weight
    # on its initial value that the B0 run keeps, for the weights, the prior and BatchNorm.
    b0 = 64
    cfg = _cfg(batch_size=int(b0 * kappa), steps=1600)
    s = scaling.resolve(cfg)
    for samples in (1024, 4096, 51200):
        at_b0, here = samples / b0, samples / s.batch_size
        assert s.ema ** here == pytest.approx(cfg["ema"] ** at_b0, rel=1e-9)
        assert s.prior_momentum ** here == pytest.approx(cfg["prior_momentum"] ** at_b0,
                                                         rel=1e-9)
        assert (1 - s.bn_momentum) ** here == pytest.approx((1 - cfg["bn_momentum"]) ** at_b0,
                                                            rel=1e-9)


def test_alpha_schedule_and_distill_start_are_the_same_function_of_samples():
    cfg = _cfg("cifar100-lt", batch_size=512)
    s = scaling.resolve(cfg)
    for samples in (0, 512 * 1000, 512 * 20000, 512 * s.steps):
        a_b0 = float(alpha_schedule(samples // 64, cfg["steps"]))
        a_here = float(alpha_schedule(samples // 512, s.steps))
        assert a_here == pytest.approx(a_b0, abs=1e-6)
    assert s.distill_start * 512 == cfg["distill_start"] * 64


def test_grad_accumulation_and_ranks_split_the_batch_not_the_rules():
    a = scaling.resolve(_cfg(batch_size=512))
    b = scaling.resolve(_cfg(batch_size=512, grad_accum=4), world_size=2)
    assert (b.kappa, b.steps, b.lr, b.ema, b.prior_momentum) == \
        (a.kappa, a.steps, a.lr, a.ema, a.prior_momentum)
    assert (b.micro_batch, b.micro_batch_ulb) == (64, 128)
    # BatchNorm statistics move once per forward: 4 forwards per step decay like one of 512.
    assert (1 - b.bn_momentum) ** 4 == pytest.approx(1 - a.bn_momentum, rel=1e-12)
    # kappa = 1 with K = 4: each forward holds B0 / 4 images, so its momentum shrinks.
    c = scaling.resolve(_cfg(grad_accum=4))
    assert (1 - c.bn_momentum) ** 4 == pytest.approx(0.99, rel=1e-12) and c.ema == 0.99


def test_no_scale_rules_keeps_every_per_step_value():
    cfg = _cfg(batch_size=512, scale_rules=False)
    s = scaling.resolve(cfg)
    assert s.kappa == 1 and scaling.apply(cfg, s) == cfg


def test_linear_warmup_from_the_base_lr_to_the_scaled_lr():
    s = scaling.resolve(_cfg(batch_size=512, warmup=6400))       # 12.5 steps -> 13
    assert s.warmup_steps == 13 and s.warmup_samples == 6400
    lrs = s.lr_table()
    assert lrs[0] == 0.03 and lrs[13] == pytest.approx(0.24) and len(lrs) == 100
    steps = [lrs[i + 1] - lrs[i] for i in range(13)]
    assert max(steps) - min(steps) < 1e-12 and min(steps) > 0         # a straight line
    assert set(lrs[13:]) == {s.lr}                                     # then constant


def test_warmup_in_unlabeled_epochs_uses_the_pool_size():
    s = scaling.resolve(_cfg(batch_size=512, warmup="1ep"), pool_size=11158)
    # one epoch of 11,158 unlabeled images at mu * B = 1024 per step: 11 steps
    assert s.warmup_steps == math.ceil(11158 / 1024)
    assert scaling.resolve(_cfg(batch_size=512, warmup="1ep")).warmup_steps == 0   # deferred


def test_sqrt_lr_scaling():
    s = scaling.resolve(_cfg(batch_size=1024, lr_scaling="sqrt"))
    assert s.kappa == 16 and s.lr == pytest.approx(0.03 * 4, rel=1e-12)


def test_cosine_decay_after_the_warmup():
    s = scaling.resolve(_cfg(batch_size=512, warmup=5120, cosine=True))   # 10 warm-up steps
    lrs = s.lr_table()
    assert lrs[10] == pytest.approx(0.24)
    assert lrs[55] == pytest.approx(0.12)                                # half way: half
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 1e-3
    plain = scaling.resolve(_cfg(cosine=True))
    assert plain.lr_at(0) == 0.03 and plain.lr_at(400) == pytest.approx(0.015)


@pytest.mark.parametrize("kw, world, flag", [
    (dict(batch_size=512, warmup=51200), 1, "--warmup"),        # warm-up as long as the run
    (dict(warmup="1ep", steps=10), 1, "--warmup"),               # checked once the pool is known
    (dict(warmup="soon"), 1, "--warmup"),
    (dict(warmup=-64), 1, "--warmup"),
    (dict(warmup=10.5), 1, "--warmup"),
    (dict(grad_accum=0), 1, "--grad-accum"),
    (dict(grad_accum=3), 1, "--batch-size"),                     # 64 is not 3 micro-batches
    (dict(batch_size=96), 64, "--batch-size"),                   # nor 64 ranks
    (dict(lr_scaling="cubic"), 1, "--lr-scaling"),
    (dict(base_batch_size=0), 1, "base_batch_size"),
])
def test_inconsistent_settings_are_refused_naming_the_flag(kw, world, flag):
    cfg = config.validate(config.load_preset("fmnist-lt"))
    cfg.update(kw)
    with pytest.raises(ValueError, match=flag):
        scaling.resolve(cfg, world_size=world, pool_size=11158)


def test_table_and_dict_hold_the_resolved_values():
    s = scaling.resolve(_cfg(batch_size=512, warmup=6400))
    text = s.table()
    for piece in ("kappa = 8", "100", "0.24", "0.922745", "0.0772553", "13 steps"):
        assert piece in text, piece
    d = s.as_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d and json.loads(json.dumps(d)) == d
    assert d["steps"] == 100 and d["given"]["steps"] == 800 and d["samples"] == 51200


@pytest.mark.parametrize("preset, accum", [("imagenet127-32-large", 2),
                                           ("imagenet127-64-large", 8)])
def test_large_presets_are_the_released_recipe_at_kappa_16(preset, accum):
    cfg = _cfg(preset)
    s = scaling.resolve(cfg, pool_size=1_281_167)
    base = _cfg(preset.replace("-large", ""))
    assert (s.kappa, s.steps, s.grad_accum, s.micro_batch) == (16, base["steps"] // 16, accum,
                                                             1024 // accum)
    assert s.samples == base["steps"] * base["batch_size"]
    assert s.lr == pytest.approx(16 * base["lr"]) and s.warmup_steps == 626
    assert s.ema == pytest.approx(base["ema"] ** 16)


# ------------------------------------------------------------------------------------------
# The driver: accumulation, resume of a scaled run, config.yaml, compiled step, reporting
# ------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _argv(data, out, *extra, steps=20, batch=8):
    return ["--data-root", str(data), "--out", str(out), "--steps", str(steps), "--n1", "20",
            "--gamma-l", "10", "--m1", "30", "--gamma-u", "10", "--batch-size", str(batch),
            "--mu", "2", "--eval-every", "10", "--log-every", "5", "--eval-batch-size", "64",
            "--threshold", "0.6", "--set", "model_width=4", "--set", "base_batch_size=8",
            "--no-progress", "--deterministic", "--time-limit", "0", *extra]


def _trainer(data, out, *extra, **kw):
    cfg, run_dir, _ = cli.resolve(cli.build_parser().parse_args(_argv(data, out, *extra, **kw)))
    os.makedirs(run_dir, exist_ok=True)
    return trainer.Trainer(cfg, run_dir)


def _freeze_batchnorm(tr):
    # Training-mode BatchNorm couples the rows of a forward: K micro-batches are normalised by
    # their own statistics, which no accumulation can undo. Running statistics make every row
    # independent, so the only difference left is the order of float32 sums.
    for m in tr.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_steps_equal_the_whole_batch_steps(data_root, tmp_path, k):
    runs = {}
    for kk in (1, k):
        tr = _trainer(data_root, tmp_path / f"k{kk}", "--grad-accum", str(kk), "--threshold",
                      "0.3", batch=16)
        _freeze_batchnorm(tr)
        for _ in range(4):
            tr.train_step()
        runs[kk] = tr
    a, b = runs[1], runs[k]
    # alpha, the prior and the step advance once per optimizer step, not once per micro-batch.
    assert int(b.crit.step) == int(a.crit.step) == 4 and b.step == 4
    torch.testing.assert_close(b.crit.prior_ulb, a.crit.prior_ulb, rtol=0, atol=1e-6)
    # 4 SGD steps at lr 0.03 on gradients that differ by float32 summation order (~1e-7
    # relative): parameters of size ~0.1-1 agree to 1e-6.
    for name, (pa, pb) in zip([n for n, _ in a.model.named_parameters()],
                              zip(a.model.parameters(), b.model.parameters())):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)
    for pa, pb in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    # The logged sums: losses and mask ratio averaged over micro-batches, counts summed.
    torch.testing.assert_close(b._log_acc, a._log_acc, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_with_training_batchnorm_runs_and_advances_once(data_root, tmp_path):
    tr = _trainer(data_root, tmp_path / "k2", "--grad-accum", "2")
    for _ in range(3):
        tr.train_step()
    assert tr.step == 3 and int(tr.crit.step) == 3 and tr.crit._pending_rows == 0
    # BatchNorm statistics moved once per forward: 2 forwards per step.
    bn = next(m for m in tr.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 6


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(argv, cwd, **env):
    return subprocess.run([sys.executable, "-m", "adello_kernels.train", *argv], cwd=cwd,
                          env={**_env(), **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_scaled_run_resumes_exactly_and_saves_its_resolved_values(data_root, tmp_path):
    # kappa = 2 (B = 16, B0 = 8) with a warm-up and a cosine decay: 30 B0-steps -> 15 steps,
    # evaluation every 5, so a kill after step 12 resumes from the checkpoint of step 10 with
    # the lr schedule, the scaled momenta and the accumulation state all restored.
    extra = ("--warmup", "48", "--cosine", "--grad-accum", "2")
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _run(_argv(data_root, full, *extra, steps=30, batch=16), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kappa = 2" in r.stdout and "15" in r.stdout              # the printed table
    r = _run(_argv(data_root, killed, *extra, steps=30, batch=16), str(tmp_path),
             **{trainer.KILL_ENV: "12"})
    assert r.returncode == -9, r.stderr[-3000:]
    r = _run(["--resume", str(killed), "--no-progress"], str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    for key in ("top1", "balanced_acc", "ece", "prior_ulb", "steps", "samples"):
        assert a[key] == b[key], key
    ca = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    for name, t in ca["model"].items():
        assert torch.equal(t, cb["model"][name]), name
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert cfg["steps"] == 30 and cfg["batch_size"] == 16          # as given, at B0
    res = cfg["resolved"]
    assert res["kappa"] == 2 and res["steps"] == 15 and res["eval_every"] == 5
    assert res["lr"] == pytest.approx(0.06) and res["warmup_steps"] == 3
    assert res["ema"] == pytest.approx(cfg["ema"] ** 2)
    assert a["steps"] == 15 and a["samples"] == 15 * 16
    log = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [3, 5, 6, 9, 10, 12, 15]
    for rec in log:
        assert rec["images_per_s"] > 0 and rec["step_time_median"] > 0
        assert rec["samples"] == rec["step"] * 16


@pytest.mark.parametrize("estimator", ["raw", "em"])
def test_compiled_step_has_no_graph_break(data_root, tmp_path, estimator):
    # em also updates the raw-estimate diagnostic in place inside the graph (fast_step.py)
    tr = _trainer(data_root, tmp_path / "c", "--compile", "step", "--prior-estimator", estimator)
    run = tr.runner
    drawn = run.draw()
    for update in (False, True):
        args = run.micro_slices(drawn, 0)
        ex = torch._dynamo.explain(run._micro)(*args, update, False)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1
    tr.crit._pending_rows = 0


def test_compiled_step_matches_the_eager_step(data_root, tmp_path, monkeypatch):
    # aot_eager: the graphs Dynamo captures, their AOTAutograd backward, no Inductor codegen
    # (minutes on a shared CPU); fullgraph=True still raises on any graph break.
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    eager = _trainer(data_root, tmp_path / "e")
    comp = _trainer(data_root, tmp_path / "c", "--compile", "step")
    for _ in range(3):
        eager.train_step()
        comp.train_step()
    torch.testing.assert_close(comp.crit.prior_ulb, eager.crit.prior_ulb, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def test_synthetic_dataset_and_throughput_report(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = cli.main(["--dataset", "synthetic", "--out", str(out), "--steps", "4", "--batch-size",
                   "8", "--eval-every", "4", "--log-every", "2", "--no-progress",
                   "--phase-timing", "--set", "model_width=4", "--set", "base_batch_size=8",
                   "--time-limit", "0"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fmnist" and summary["synthetic"] is True
    assert summary["images_per_s"] > 0 and summary["step_time_median"] > 0
    assert summary["samples"] == 4 * 8 and summary["unlabeled_samples"] == 4 * 16
    assert summary["unlabeled_epochs"] == pytest.approx(4 * 16 / summary["ulb_pool_size"])
    assert set(summary["phases"]) == {"sample_augment", "forward_backward", "optimizer_ema"}
    assert summary["peak_memory_bytes"] is None          # CPU


@pytest.mark.parametrize("argv, flag", [
    (["--grad-accum", "3"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--warmup", "100000"], "--warmup"),
    (["--lr-scaling", "cube"], "--lr-scaling"),
    (["--grad-accum", "2", "--temperature", "imbalance_aware"], "--grad-accum"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph"),
])
def test_driver_refuses_inconsistent_flags(argv, flag, tmp_path, capsys):
    # Refused before any data is read (the data root does not exist).
    try:
        rc = cli.main(_argv(tmp_path / "nodata", tmp_path / "out", *argv))
    except SystemExit as exc:          # argparse's own choices
        rc = exc.code
    assert rc == 2
    assert flag in capsys.readouterr().err
