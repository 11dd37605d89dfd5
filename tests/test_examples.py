"""examples/finetune.py: a vocabulary the random-init model can learn from, the loss printed while it
trains, --fp16 ignored with a message on CPU."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_vocabulary_covers_every_word_of_the_data():
    ex = _example()
    tok, model = ex.load("config")
    texts = ex.POSITIVE + ex.NEGATIVE
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids), [tok.convert_ids_to_tokens(r) for r in ids]
    assert len(tok) == model.config.vocab_size
    words = {w for row in ids for w in row}
    assert len(words) > 60, len(words)        # word-level: the sentences share few tokens


def test_cli_prints_the_loss_per_step_and_ignores_fp16_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", "config", "--steps", "3", "--batch-size", "4",
                          "--modes", "fused_attn", "--device", "cpu", "--fp16", "--log-every", "1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--fp16 is ignored on cpu" in res.stderr
    losses = [float(x) for x in re.findall(r"step +\d+/3 +loss (\d+\.\d+)", res.stdout)]
    assert len(losses) == 3, res.stdout
    assert re.search(r"fused_attn: +[\d.]+ ms/step +final loss", res.stdout), res.stdout
