"""accelerate's hooks and fused_attn.patch, in either order, with the padded patch and with
padding_free=True.  Runs with the installed transformers (5.x in .venv, 4.x in .venv-hf4).

accelerate wraps a module's forward on the instance (add_hook_to_module, behind cpu_offload,
disk_offload and dispatch_model / from_pretrained(device_map=...); see
fused_attn/integrations/instance_forward.py).  For each case: the hooked, patched model matches HF
eager (DESIGN's rule; padding_free: on the real tokens, zeros at padding), the fused kernel serves
every layer, the hooks run (a padding-free encoder's layers see the packed tokens), and unpatch
gives back the hooked model: the eager model's outputs bit for bit, its hooks running, no fused
class or packed forward left under them.
"""
import warnings

import pytest
import torch

import fused_attn
from _hf import TINY, TRANSFORMERS_5, assert_close_to_oracle, oracle_of
from fused_attn import ops
from fused_attn.integrations import packed_layers
from fused_attn.integrations import padding_free as pf
from fused_attn.integrations.bert import FusedBertSelfAttention
from _hf import MASK, check_real_tokens, inputs, tiny

accelerate = pytest.importorskip("accelerate")
from accelerate import cpu_offload, dispatch_model  # noqa: E402
from accelerate.hooks import ModelHook, add_hook_to_module  # noqa: E402

N_LAYERS = TINY["num_hidden_layers"]


class Record(ModelHook):
    """Logs (module name, shape of the first positional input) before each call."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def pre_forward(self, module, *args, **kwargs):
        self.log.append((self.name, tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None))
        return args, kwargs


def _encoder_name(model):
    return "transformer" if hasattr(model, "transformer") else "encoder"


def _attention_classes(model):
    """Class names of the attention blocks (plain and fused), for preload_module_classes."""
    att = getattr(model, _encoder_name(model)).layer[0].attention
    att = getattr(att, "self", att)
    name = getattr(type(att), "_fused_original_class", type(att)).__name__
    return [name, "Fused" + name]


def _record(model, names):
    log = []
    for name, m in model.named_modules():
        if (names is None and not isinstance(m, torch.nn.ModuleList)) or (names is not None and name in names):
            add_hook_to_module(m, Record(log, name or "model"))
    return log


def setup_hooks(model, tmp_path, what):
    """Installs accelerate's hooks on ``model``; returns the Record log, or None."""
    enc = _encoder_name(model)
    if what == "hooks":                       # every module
        return _record(model, None)
    if what == "layer-hooks":                 # the modules the padding-free path calls as such
        return _record(model, {"", enc} | {f"{enc}.layer.{i}" for i in range(N_LAYERS)})
    if what == "cpu_offload":                 # weights on the meta device between calls
        cpu_offload(model, execution_device="cpu")
    elif what == "preload":                   # the attention block loads its children's weights
        cpu_offload(model, execution_device="cpu", preload_module_classes=_attention_classes(model))
    elif what == "dispatch":                  # a device map with a layer offloaded to disk
        device_map = {"embeddings": "cpu", f"{enc}.layer.0": "cpu", f"{enc}.layer.1": "disk"}
        if getattr(model, "pooler", None) is not None:
            device_map["pooler"] = "cpu"
        dispatch_model(model, device_map, offload_dir=str(tmp_path))
    return None


def _falls_back(what, padding_free):
    """Hooks that matter on the attention blocks, which the packed layer does not call."""
    return padding_free and what in ("hooks", "preload")


def _check_unpatched_structure(model):
    """No fused class, no packed forward; every accelerate wrapper wraps its own module's class forward."""
    for name, m in model.named_modules():
        assert not isinstance(m, (FusedBertSelfAttention, pf._PaddingFreeEncoder)), name
        assert not any(isinstance(v, packed_layers.LayerForward) for v in m.__dict__.values()), name
        old = m.__dict__.get("_old_forward")
        if old is not None:
            assert old.__self__ is m and old.__func__ is type(m).forward, f"{name}: _old_forward {old}"
            assert m.__dict__["forward"].args[0] is m, name


CASES = [(family, padding_free, what) for family in ("bert", "distilbert") for padding_free in (False, True)
         for what in ("hooks", "layer-hooks", "cpu_offload", "preload", "dispatch")
         if padding_free or family != "distilbert"]       # DistilBERT: padding_free only (no BertSelfAttention)


@pytest.mark.parametrize("order", ["hooks-then-patch", "patch-then-hooks"])
@pytest.mark.parametrize("family, padding_free, what", CASES)
def test_accelerate_hooks_and_patch(family, padding_free, what, order, tmp_path, monkeypatch):
    model = tiny(family)
    x = inputs()
    with torch.no_grad():
        oracle = oracle_of(model)(**x).last_hidden_state
        eager = model(**x).last_hidden_state
    if order == "hooks-then-patch":
        log = setup_hooks(model, tmp_path, what)
        fused_attn.patch(model, padding_free=padding_free)
    else:
        fused_attn.patch(model, padding_free=padding_free)
        log = setup_hooks(model, tmp_path, what)
    hooked = [n for n, m in model.named_modules() if "_hf_hook" in m.__dict__]
    assert hooked, "accelerate put no hook on the model"

    calls = []
    real = ops.fused_attention
    monkeypatch.setattr(ops, "fused_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    if log:
        log.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = model(**x).last_hidden_state
    fell_back = [str(w.message) for w in caught if "padding_free" in str(w.message)]
    packed = padding_free and not _falls_back(what, padding_free)
    # the padded path of a DistilBERT is fused only through 5.x's attention interface (test_hf_routes)
    fused = packed or family != "distilbert" or TRANSFORMERS_5
    assert len(calls) == (N_LAYERS if fused else 0), f"{len(calls)} fused calls for {N_LAYERS} layers"
    if packed:
        assert not fell_back, fell_back
        check_real_tokens(f"{family} {what} {order}", got, oracle, eager, MASK)
    else:
        if padding_free:
            assert len(fell_back) == 1 and "accelerate hooks on layer.0.attention" in fell_back[0], fell_back
        assert_close_to_oracle(f"{family} {what} {order}", got, oracle, eager)
    if what in ("cpu_offload", "dispatch"):          # the offloaded weights went back after the call
        assert any(p.device.type == "meta" for p in model.parameters())
    # every hook ran; the attention dropout's only on an eager path (the fused kernel applies it itself,
    # eager 5.x functionally)
    in_kernel = {n for n in hooked if n.endswith(("attention.self.dropout", "attention.dropout"))}
    if log is not None:
        assert {name for name, _ in log} - in_kernel == {n or "model" for n in hooked} - in_kernel, sorted(log)
        layer_shapes = {shape for name, shape in log if name.rsplit(".", 1)[0].endswith("layer")}
        want = (1, int(MASK.sum()), TINY["hidden_size"]) if packed else (*MASK.shape, TINY["hidden_size"])
        assert layer_shapes == {want}, layer_shapes

    fused_attn.unpatch(model)
    _check_unpatched_structure(model)
    if log:
        log.clear()
    calls.clear()
    with torch.no_grad():
        again = model(**x).last_hidden_state
    assert not calls, "unpatched model still runs the fused kernel"
    assert torch.equal(again, eager), f"after unpatch: max difference {(again - eager).abs().max()}"
    if log is not None:
        assert {name for name, _ in log} - in_kernel == {n or "model" for n in hooked} - in_kernel
