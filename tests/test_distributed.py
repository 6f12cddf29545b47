"""`sync_prior`: two gloo processes on CPU end with the prior of one process that saw the
concatenated batches (and, with sync_prior=False, drift apart as the released code does)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adello_kernels as ak

from utils import make_inputs

C, STEPS, WORLD = 7, 4, 2


def global_batches():
    # Unequal halves on purpose (N = 6 + 4 per step): the all-reduce must weight by rows.
    return [make_inputs(8, 10, C, seed=100 + s, scale=5.0)[:4] for s in range(STEPS)]


def global_weights():
    """Prior weights per step (the released lb_in_ulb_mask: 1 = truly unlabeled): step 1 has no
    positive weight on rank 0's rows, step 3 none at all (Q must stay)."""
    gen = torch.Generator().manual_seed(9)
    ws = [(torch.rand(10, generator=gen) < 0.6).float() for _ in range(STEPS)]
    ws[1][:6] = 0.0
    ws[1][6] = 1.0
    ws[3].zero_()
    return ws


def shard(batch, rank):
    z_l, y, z_w, z_s = batch
    lb = slice(0, 4) if rank == 0 else slice(4, 8)
    ulb = slice(0, 6) if rank == 0 else slice(6, 10)
    return z_l[lb], y[lb], z_w[ulb], z_s[ulb]


def shard_weights(w, rank):
    return w[0:6] if rank == 0 else w[6:10]


def prior_lb():
    p = torch.arange(1, C + 1, dtype=torch.float32)
    return p / p.sum()


CONFIGS = {"sync": (True, 1.0, False), "sync-imbalance": (True, "imbalance_aware", False),
           "nosync": (False, 1.0, False), "sync-weighted": (True, 1.0, True),
           "sync-imbalance-weighted": (True, "imbalance_aware", True)}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        for name, (sync_prior, temperature, weighted) in CONFIGS.items():
            crit = ak.ADELLOLoss(prior_lb(), 100, prior_momentum=0.8, sync_prior=sync_prior,
                                 temperature=temperature, distill_start=2)
            for batch, w in zip(global_batches(), global_weights()):
                kw = {"prior_weight": shard_weights(w, rank)} if weighted else {}
                crit(*shard(batch, rank), **kw)
            torch.save(crit.state_dict(), os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_states(tmp_path_factory):
    """{config: [state_dict of rank 0, of rank 1]} after STEPS steps (one spawn for all)."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return {name: [torch.load(tmp / f"{name}-rank{r}.pt") for r in range(WORLD)]
            for name in CONFIGS}


@pytest.mark.parametrize("name", ["sync", "sync-imbalance", "sync-weighted",
                                  "sync-imbalance-weighted"])
def test_sync_prior_matches_single_process_on_global_batch(world_states, name):
    """The all-reduced prior is the global batch's (weighted by rows, or by prior-weight sums:
    a rank with no positive weight adds nothing, and no positive weight anywhere keeps Q)."""
    _, temperature, weighted = CONFIGS[name]
    single = ak.ADELLOLoss(prior_lb(), 100, prior_momentum=0.8, temperature=temperature,
                           distill_start=2)
    for batch, w in zip(global_batches(), global_weights()):
        single(*batch, **({"prior_weight": w} if weighted else {}))
    for state in world_states[name]:
        torch.testing.assert_close(state["prior_ulb"], single.prior_ulb, rtol=0, atol=1e-6)
        torch.testing.assert_close(state["temperature"], single.temperature, rtol=1e-5,
                                   atol=0)
        assert int(state["step"]) == STEPS
        assert int(state["skipped_updates"]) == 0
    assert not torch.allclose(single.prior_ulb, torch.full((C,), 1.0 / C))


def test_without_sync_each_rank_drifts_on_its_own_batch(world_states):
    s0, s1 = world_states["nosync"]
    assert (s0["prior_ulb"] - s1["prior_ulb"]).abs().max() > 1e-4
    local = ak.ADELLOLoss(prior_lb(), 100, prior_momentum=0.8, distill_start=2)
    for batch in global_batches():
        local(*shard(batch, 0))
    torch.testing.assert_close(s0["prior_ulb"], local.prior_ulb, rtol=0, atol=1e-6)
