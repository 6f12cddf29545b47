"""Reliability of `python -m adello_kernels.train`: divergence never destroys good state,
damaged checkpoints and changed data are refused, every bad flag is rejected before any work,
run directories are claimed exclusively, interrupted runs can always be continued, the
ADELLOLoss state loads all or nothing, DDP stalls name the stalled rank, and the training loop
has no per-step host sync. Tiny fake Fashion-MNIST in the real idx format, a few steps each."""
import gzip
import json
import os
import resource
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from test_train_data import write_fmnist
from test_train_e2e import _args, _env, _jsonl, _run
from torch.utils._python_dispatch import TorchDispatchMode

import adello_kernels as ak
from adello_kernels.train import checkpoint, cli, config, rundir, trainer

CKPT = os.path.join("checkpoints", "last.pt")




def _small(data, out, steps=20, extra=()):
    return _args(data, out, steps=steps, extra=extra)


def _flip_tensor_byte(path):
    """Flip one byte inside the largest tensor record of a torch zip checkpoint (the zip
    structure and the pickle stay valid)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    off = info.header_offset
    name_len = int.from_bytes(raw[off + 26:off + 28], "little")
    extra_len = int.from_bytes(raw[off + 28:off + 30], "little")
    pos = off + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0x40
    open(path, "wb").write(bytes(raw))


# ------------------------------------------------------------------------------------------
# 1. Divergence
# ------------------------------------------------------------------------------------------

def _record_saves(monkeypatch):
    """The bytes of last.pt after every save of the run."""
    saved = []
    orig = trainer.Trainer.save

    def save(self, *a, **k):
        orig(self, *a, **k)
        saved.append((self.step, open(self.ckpt_path, "rb").read()))
    monkeypatch.setattr(trainer.Trainer, "save", save)
    return saved


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint_byte_for_byte(
        data_root, tmp_path, monkeypatch, capsys):
    saved = _record_saves(monkeypatch)
    monkeypatch.setenv(trainer.NAN_ENV, "13")      # NaN images at step 13: everything after is NaN
    out = tmp_path / "div"
    assert cli.main(_small(data_root, out, steps=30)) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "from step 10, intact" in err
    assert [s for s, _ in saved] == [10]
    assert (out / CKPT).read_bytes() == saved[-1][1]            # untouched since step 10
    assert (out / "checkpoints" / "best.pt").read_bytes() == saved[-1][1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_checkpoint_step"] == 10
    assert summary["nonfinite_steps"] >= 1 and summary["skipped_updates"] >= 1
    log = _jsonl(out / "train_log.jsonl")
    assert log[-1]["step"] == 15 and log[-1]["nonfinite_steps"] == 3
    assert all("skipped_updates" in r for r in log)
    state = torch.load(out / CKPT, weights_only=True)
    assert checkpoint.nonfinite_entries(state) == []


def test_huge_learning_rate_is_reported_not_saved_as_a_model(data_root, tmp_path, capsys):
    out = tmp_path / "lr"
    assert cli.main(_small(data_root, out, steps=30, extra=("--lr", "1000"))) == 3
    assert "diverged" in capsys.readouterr().err
    assert not (out / CKPT).exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_skip_policy_leaves_out_a_nonfinite_update_and_keeps_training(data_root, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv(trainer.NAN_ENV, "7")
    out = tmp_path / "skip"
    assert cli.main(_small(data_root, out, extra=("--on-nonfinite", "skip"))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 20
    assert s["skipped_steps"] == 1 and s["nonfinite_steps"] == 1 and s["skipped_updates"] == 1
    assert s["best"]["step"] in (10, 20) and (out / "checkpoints" / "best.pt").is_file()
    state = torch.load(out / CKPT, weights_only=True)
    assert checkpoint.nonfinite_entries(state) == []
    assert [r["skipped_steps"] for r in _jsonl(out / "train_log.jsonl")] == [0, 1, 0, 0]


# ------------------------------------------------------------------------------------------
# 2. Checkpoint checksum and finiteness
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run10(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run10"
    r = _run(_small(data_root, out, steps=10), cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(src, tmp_path, name="copy"):
    import shutil
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_in_checkpoint_tensor_data_is_refused(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    _flip_tensor_byte(run / CKPT)
    torch.load(run / CKPT, weights_only=True)       # torch itself loads the damaged file
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "checksum" in err and "weights_only" not in err


def test_checkpoint_with_nonfinite_weights_is_refused(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    state = torch.load(run / CKPT, weights_only=True)
    k = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][k] = torch.full_like(state["model"][k], float("nan"))
    torch.save(checkpoint.with_checksum(state), run / CKPT)   # a valid checksum of bad state
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    assert "non-finite" in capsys.readouterr().err


def test_truncated_checkpoint_message_never_suggests_weights_only_false(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    (run / CKPT).write_bytes(b"\x80\x02garbage" * 10)
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "weights_only" not in err


# ------------------------------------------------------------------------------------------
# 3. Every value validated, naming its flag, before the data loads
# ------------------------------------------------------------------------------------------

BAD_VALUES = [
    (["--n1", "-5"], "--n1"), (["--m1", "-1"], "--m1"),
    (["--set", "weight_decay=-1e-4"], "--set weight_decay"),
    (["--set", "momentum=1"], "--set momentum"), (["--set", "momentum=-0.1"], "--set momentum"),
    (["--set", "bn_momentum=2"], "--set bn_momentum"), (["--set", "bn_momentum=0"],
                                                       "--set bn_momentum"),
    (["--time-limit", "-1"], "--time-limit"), (["--set", "steps=true"], "--steps"),
    (["--set", "deterministic=maybe"], "--deterministic"), (["--set", "split=stl10"],
                                                             "--set split"),
    (["--set", "image_size=13"], "--set image_size"), (["--model-width", "-3"], "--model-width"),
    (["--threshold", "1.5"], "--threshold"), (["--seed", "-1"], "--seed"), (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--dist-timeout", "0"], "--dist-timeout"),
    (["--set", "model=vgg"], "--model"), (["--set", "ema=1"], "--ema"),
]


@pytest.mark.parametrize("argv,flag", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_its_flag_before_the_data_loads(argv, flag, tmp_path,
                                                                     capsys, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("the dataset was read before the flags were checked")
    monkeypatch.setattr(trainer.data_mod, "read_dataset", no_data)
    assert cli.main(argv + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err, err
    assert not (tmp_path / "x").exists()


def test_resume_with_another_out_is_refused(run10, tmp_path, capsys):
    assert cli.main(["--resume", str(run10), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# 4. The data actually used is fingerprinted
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,part", [("invert_train", "train_images"),
                                         ("zero_test_labels", "test_labels")])
def test_resume_on_changed_images_or_test_labels_is_refused(run10, tmp_path, capsys, change,
                                                           part):
    run = _copy(run10, tmp_path)
    alt = tmp_path / "data"
    x, y, tx, ty = write_fmnist(str(alt), per_class_train=60, per_class_test=10)
    from test_train_data import _idx_bytes
    if change == "invert_train":
        with gzip.open(alt / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(255 - x))
    else:
        with gzip.open(alt / "t10k-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(np.zeros_like(ty)))
    assert cli.main(["--resume", str(run), "--data-root", str(alt), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "data_fingerprint.json" in err and part in err


# ------------------------------------------------------------------------------------------
# 5, 6, 8. Run directories: exclusive claim, a way forward, no stale temp files
# ------------------------------------------------------------------------------------------

def test_two_launches_cannot_share_a_run_directory(tmp_path, capsys):
    held = rundir.claim(str(tmp_path / "shared"), resume=False, explicit=True)
    try:
        assert cli.main(["--out", str(tmp_path / "shared"), "--no-progress"]) == 2
        assert "in use by another process" in capsys.readouterr().err
    finally:
        held.release()


def test_default_run_names_do_not_collide_within_one_second(tmp_path):
    name = str(tmp_path / "runs" / "fmnist-lt-adello-20260101-000000")
    claims = [rundir.claim(name, resume=False, explicit=False) for _ in range(3)]
    try:
        assert len({c.path for c in claims}) == 3
    finally:
        for c in claims:
            c.release()


def test_crash_before_the_first_checkpoint_resumes_from_step_0(data_root, tmp_path, capsys):
    out = tmp_path / "early"
    bad = _small(tmp_path / "missing-data", out, steps=10)
    assert cli.main(bad) == 1                     # dies while the data loads
    assert (out / "config.yaml").is_file() and not (out / CKPT).exists()
    capsys.readouterr()
    assert cli.main(["--resume", str(out), "--data-root", str(data_root), "--no-progress"]) == 0
    assert "starting it from step 0" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


def test_stale_checkpoint_temp_files_are_removed_at_start(run10, tmp_path):
    run = _copy(run10, tmp_path)
    stale = run / "checkpoints" / ".last.pt.tmp.999999"
    stale.write_bytes(b"x" * 1000)
    assert cli.main(["--resume", str(run), "--no-progress"]) == 0
    assert not stale.exists()


# ------------------------------------------------------------------------------------------
# 7. ADELLOLoss.load_state_dict is all or nothing
# ------------------------------------------------------------------------------------------

def _crit(c=5):
    crit = ak.ADELLOLoss(torch.full((c,), 1.0 / c), 50, backend="reference")
    crit.step.fill_(7)
    crit.skipped_updates.fill_(2)
    crit.prior_ulb.copy_(torch.softmax(torch.randn(c), 0))
    return crit


def _bad_states():
    good = _crit().state_dict()
    yield "other class count", _crit(7).state_dict()
    for key, value in (("prior_ulb", torch.full((5,), float("nan"))),
                       ("prior_ulb", torch.full((5,), 0.3)),
                       ("prior_lb", torch.tensor([1.5, -0.5, 0.0, 0.0, 0.0])),
                       ("step", torch.tensor(-1)), ("skipped_updates", torch.tensor(-3)),
                       ("temperature", torch.tensor(float("inf"))),
                       ("step", torch.tensor(3.0))):
        yield key, {**good, key: value}


@pytest.mark.parametrize("what,state", list(_bad_states()),
                         ids=[w for w, _ in _bad_states()])
def test_rejected_adello_state_leaves_the_module_unchanged(what, state):
    crit = _crit()
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    with pytest.raises(RuntimeError):
        crit.load_state_dict(state)
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), (what, k)


def test_valid_adello_state_still_loads():
    a, b = _crit(), ak.ADELLOLoss(torch.full((5,), 0.2), 50, backend="reference")
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ------------------------------------------------------------------------------------------
# 10. Clear messages instead of tracebacks
# ------------------------------------------------------------------------------------------

def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli.main(["--out", str(f), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_truncated_gz_data_file_is_named(tmp_path, capsys):
    root = tmp_path / "d"
    write_fmnist(str(root), per_class_train=60, per_class_test=10)
    gz = root / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:2000])
    assert cli.main(_small(root, tmp_path / "o", steps=2)) == 1
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_invalid_yaml_in_config_is_a_clear_error(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    (run / "config.yaml").write_text("steps: [10\nlr: 0.03\n")
    assert cli.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "YAML" in err


def test_last_checkpoint_being_a_directory_is_a_clear_error(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    (run / CKPT).unlink()
    (run / CKPT).mkdir()
    assert cli.main(["--resume", str(run), "--no-progress"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_full_disk_when_saving_says_what_was_kept(run10, tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`): every write past the limit fails with EFBIG, as on a full
    disk; the step-10 checkpoint is already larger than the limit."""
    run = _copy(run10, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["steps"] = 20
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # The checkpoint's config digest changes with steps: rewrite it for the edited config.
    state = torch.load(run / CKPT, weights_only=True)
    state["config_digest"] = config.digest(config.validate({**config.DEFAULTS, **cfg}))
    torch.save(checkpoint.with_checksum(state), run / CKPT)
    before = (run / CKPT).read_bytes()
    limit = len(before) // 2

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, "-m", "adello_kernels.train", "--resume", str(run),
                        "--no-progress"], cwd=str(tmp_path), env=_env(), capture_output=True,
                       text=True, timeout=300, preexec_fn=cap)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "File too large" in r.stderr and "from step 10, intact" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (run / CKPT).read_bytes() == before
    assert not [p for p in os.listdir(run / "checkpoints") if ".tmp." in p]


# ------------------------------------------------------------------------------------------
# No per-step host sync
# ------------------------------------------------------------------------------------------

class _SyncCounter(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (.item(), bool(), ==)."""
    SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNC_OPS):
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_training_steps_between_logs_read_no_tensor_value_on_the_host(data_root, tmp_path,
                                                                     policy, monkeypatch):
    # The reference criterion (plain PyTorch): the fused CPU kernel's backward reads its
    # incoming gradient on the host by design (free on a CPU; never done on a GPU), and what
    # is checked here is the training loop around the criterion.
    argv = _small(data_root, tmp_path / "sync", extra=("--on-nonfinite", policy,
                                                      "--backend", "reference"))
    cfg, run_dir, _ = cli.resolve(cli.build_parser().parse_args(argv))
    (tmp_path / "sync").mkdir()
    t = trainer.Trainer(cfg, str(tmp_path / "sync"))
    t.model.train()
    reads = []
    for name in ("tolist", "numpy", "cpu", "__array__"):   # host copies the mode cannot see
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=orig, _n=name, **k: (reads.append(_n),
                                                                      _o(self, *a, **k))[1])
    with _SyncCounter() as mode:
        for _ in range(4):
            t.train_step()
    assert mode.hits == [] and reads == []
    monkeypatch.undo()
    with _SyncCounter() as mode:
        rec, health = t.flush_log()                 # the one read per log step
    assert health["window"] == 4 and not health["state_bad"] and rec["nonfinite_steps"] == 0


# ------------------------------------------------------------------------------------------
# 9. DDP: a stalled rank is named after --dist-timeout
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stalled_rank_is_named_after_the_collective_timeout(data_root, tmp_path):
    out = tmp_path / "ddp"
    args = _small(data_root, out, steps=8) + ["--dist-timeout", "4", "--log-every", "2"]
    r = _run(args, cwd=str(tmp_path), launcher=["torch.distributed.run", "--standalone",
                                                "--nproc_per_node", "2", "-m"],
             **{trainer.STALL_ENV: "1:5:40"})
    assert r.returncode != 0
    text = r.stderr + r.stdout
    assert "--dist-timeout 4 s" in text and "stalled: rank 1 (last logged step 4)" in text, \
        text[-3000:]
