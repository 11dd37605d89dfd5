"""Distributed training with a patched BERT (random-init tiny config), 2 processes on CPU (gloo):
DistributedDataParallel and FSDP2 (torch.distributed.fsdp.fully_shard, per layer and the root; and
for a padding-free model, the whole model as one unit too, and per layer with torch's
checkpoint_wrapper outside or inside fully_shard) give the loss and the
gradients of one process on the whole batch, and with dropout on, runs with the same seeds are
identical.  (docs/huggingface.md, "Distributed training": the same under torchrun / accelerate.)"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

WORLD = 2
B, S, STEPS = 4, 16, 2
CFG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
           max_position_embeddings=64, attn_implementation="eager")


def _why_not() -> str:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "available")


def make_model(dropout: float, padding_free: bool = False):
    import fused_attn

    torch.manual_seed(0)
    cfg = transformers.BertConfig(attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout, **CFG)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    fused_attn.patch(model, padding_free=padding_free)
    assert fused_attn.integrations.hf.fused_modules(model), "patch found no attention module"
    return model.train()


def make_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (B, S), generator=g)
    lengths = torch.tensor([16, 9, 3, 12])
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    w = torch.randn(S, CFG["hidden_size"], generator=g)
    return ids, mask, w


def train(model, ids, mask, w, rank=0, world=1, seed=0):
    """STEPS of SGD on this rank's shard of the batch; (losses averaged over ranks, last grads)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = slice(rank * B // world, (rank + 1) * B // world)
    torch.manual_seed(seed + rank)                # dropout draws (per rank, as a launcher seeds them)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        hidden = model(input_ids=ids[shard], attention_mask=mask[shard]).last_hidden_state
        loss = (hidden * w).mean()
        loss.backward()
        opt.step()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):             # FSDP2: a sharded DTensor
            g = g.full_tensor()
        grads[name.replace("_checkpoint_wrapped_module.", "").replace("module.", "")] = g.detach().clone()
    return torch.stack(losses), grads


def _rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids, mask, w = make_batch()
        results = {"ddp": train(DDP(make_model(0.0)), ids, mask, w, rank, WORLD)}
        for run in ("dropout-1", "dropout-2"):
            results[run] = train(DDP(make_model(0.1)), ids, mask, w, rank, WORLD, seed=7)
        model = make_model(0.0)
        for layer in model.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        results["fsdp2"] = train(model, ids, mask, w, rank, WORLD)
        # padding_free: DDP, FSDP2 sharding the whole model as one unit, and FSDP2 sharding each
        # encoder layer (the packed encoder calls each layer as a module, so FSDP2's per-layer
        # hooks gather its parameters before the layer runs on packed tokens)
        results["ddp-padding-free"] = train(DDP(make_model(0.0, padding_free=True)), ids, mask, w, rank, WORLD)
        model = make_model(0.0, padding_free=True)
        fully_shard(model)
        results["fsdp2-padding-free"] = train(model, ids, mask, w, rank, WORLD)
        model = make_model(0.0, padding_free=True)
        for layer in model.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        results["fsdp2-layers-padding-free"] = train(model, ids, mask, w, rank, WORLD)
        # with activation checkpointing: checkpoint_wrapper around each layer, then fully_shard on the
        # wrapped layers (torchtitan's order), and fully_shard inside checkpoint_wrapper; each layer
        # runs again on packed tokens in the backward pass (counted), its parameters gathered for it
        from fused_attn.integrations import padding_free as pf
        real, runs = pf.varlen_attention, []
        pf.varlen_attention = lambda *a, **k: runs.append(1) or real(*a, **k)
        for order in ("fsdp2-checkpoint-padding-free", "checkpoint-fsdp2-padding-free"):
            model = make_model(0.0, padding_free=True)
            layers = model.encoder.layer
            for i, layer in enumerate(layers):
                if order.startswith("fsdp2"):
                    layers[i] = checkpoint_wrapper(layer)
                    fully_shard(layers[i])
                else:
                    layers[i] = checkpoint_wrapper(fully_shard(layer))
            fully_shard(model)
            runs.clear()
            results[order] = train(model, ids, mask, w, rank, WORLD)
            results[order + "-attention-runs"] = len(runs)
        pf.varlen_attention = real
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    ids, mask, w = make_batch()
    return train(make_model(0.0), ids, mask, w)


@pytest.fixture(scope="module")
def single_padding_free():
    torch.set_num_threads(1)
    ids, mask, w = make_batch()
    return train(make_model(0.0, padding_free=True), ids, mask, w)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2", "ddp-padding-free", "fsdp2-padding-free",
                                     "fsdp2-layers-padding-free", "fsdp2-checkpoint-padding-free",
                                     "checkpoint-fsdp2-padding-free"])
def test_two_processes_match_one_process_on_the_whole_batch(ranks, single, single_padding_free, wrapper):
    """The padding-free model too (zeros at padding: compared with its own one-process run)."""
    losses, grads = single_padding_free if wrapper.endswith("padding-free") else single
    for rank, res in enumerate(ranks):
        got_losses, got_grads = res[wrapper]
        torch.testing.assert_close(got_losses, losses, msg=lambda m: f"{wrapper} rank {rank} losses: {m}")
        assert got_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(got_grads[name], g, msg=lambda m: f"{wrapper} rank {rank} grad {name}: {m}")
        if "checkpoint" in wrapper:            # forward, and again in the backward pass: it did checkpoint
            assert res[wrapper + "-attention-runs"] == STEPS * 2 * CFG["num_hidden_layers"]


def test_dropout_runs_with_the_same_seeds_are_identical(ranks, single):
    for res in ranks:
        (l1, g1), (l2, g2) = res["dropout-1"], res["dropout-2"]
        assert torch.equal(l1, l2)
        assert all(torch.equal(g1[n], g2[n]) for n in g1)
        assert not torch.equal(l1, single[0])        # dropout was on
    assert all(torch.equal(ranks[0]["dropout-1"][1][n], ranks[1]["dropout-1"][1][n]) for n in single[1])
