"""Several threads at once, as in a serving process: a patched HF BERT (random-init tiny config)
and fused_attn.attention called from a bounded ThreadPoolExecutor give exactly the serial
results, and the mask caches (fused_attn.masks._MaskCache) stay correct under that load --
threads with different masks of the same shape, evictions, masks modified in place."""
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fused_attn
from fused_attn import masks, reference
from _utils import padding_mask

WORKERS = 4


@pytest.fixture
def busy_switching():
    """Switch threads every microsecond instead of every 5 ms: races show up in seconds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_patched_bert_threads_match_serial(busy_switching):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    fused_attn.patch(model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(12):                       # same shape [3, 24], different padding per batch
        ids = torch.randint(5, 97, (3, 24), generator=g)
        lengths = torch.randint(1, 25, (3,), generator=g)
        mask = padding_mask(lengths, 24, left=i % 3 == 0).long()
        if i % 4 == 1:                        # holes: a key-padding mask that needs a mask load
            mask[:, 1] = 0
        batches.append((ids, mask))

    def run(i):
        ids, mask = batches[i]
        with torch.inference_mode():
            return i, model(input_ids=ids, attention_mask=mask).last_hidden_state

    serial = [run(i)[1] for i in range(len(batches))]
    order = [i for i in range(len(batches)) for _ in range(4)]
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, got in pool.map(run, order):
            assert torch.equal(got, serial[i]), f"batch {i}: threaded result differs from the serial one"


def _attend(q, k, v, mask):
    return fused_attn.attention(q, k, v, mask, backend="cpu")


def test_threads_with_different_masks_of_one_shape(busy_switching):
    """More masks than the cache holds (evictions), the same shape, many threads: every call's
    result is its own mask's serial result."""
    B, H, S, D = 2, 2, 40, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    kinds = [lambda: torch.rand(B, S, generator=g) > 0.5,                        # key padding, holes
             lambda: torch.rand(B, S, S, generator=g) > 0.5,                     # per pair
             lambda: torch.where(torch.rand(B, 1, 1, S, generator=g) > 0.3, 0.0, float("-inf"))]
    mask_list = [kinds[i % 3]() for i in range(3 * masks._CACHE.size)]
    serial = [_attend(q, k, v, m) for m in mask_list]
    order = list(range(len(mask_list))) * 6
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, got in zip(order, pool.map(lambda i: _attend(q, k, v, mask_list[i]), order)):
            assert torch.equal(got, serial[i]), f"mask {i}"


def test_threads_modifying_their_masks_in_place(busy_switching):
    """Each thread owns one mask buffer and rewrites it in place before every call (a serving
    loop reusing a buffer): the cache must never hand back the reduction of earlier contents."""
    B, H, S, D = 2, 2, 33, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))

    def worker(seed):
        r = torch.Generator().manual_seed(seed)
        buf = torch.ones(B, S, dtype=torch.bool)
        for _ in range(30):
            lengths = torch.randint(0, S + 1, (B,), generator=r)
            buf.copy_(padding_mask(lengths, S))
            if torch.rand((), generator=r) < 0.5:
                buf[:, 0] = False                               # sometimes a hole
            want = reference.attention(q, k, v, buf.clone())
            got = _attend(q, k, v, buf)
            if not torch.allclose(got, want, atol=1e-5, rtol=0):
                return f"thread {seed}: result of a stale mask reduction"
        return None

    with ThreadPoolExecutor(WORKERS) as pool:
        errors = [e for e in pool.map(worker, range(8)) if e]
    assert not errors, errors


def test_cache_keeps_the_version_it_reduced():
    """A mask changed in place while it is being reduced (by another thread) must not be cached
    under its new version with the reduction of its old contents."""
    mask = padding_mask([5, 9], 9)
    real = masks._reduce

    def reduce_then_modified_elsewhere(m, *shape):
        red = real(m, *shape)
        m[:, 2] = False                   # another thread writes while this one reduces
        return red

    masks._CACHE.clear()
    try:
        masks._reduce = reduce_then_modified_elsewhere
        masks.reduce_mask(mask, 2, 1, 4, 9)
    finally:
        masks._reduce = real
    red = masks.reduce_mask(mask, 2, 1, 4, 9)
    assert red.key_needs_mask.tolist() == [1, 1], "the cache returned the reduction of the old contents"


def test_cache_under_concurrent_put_get_and_deletion(busy_switching):
    """Hammer the cache directly: puts that evict, gets, masks dying (weakref callbacks) from many
    threads at once.  No exception, and a hit is always the entry of that very tensor."""
    cache = masks._MaskCache(size=2)          # every put evicts
    errors = []
    stop = threading.Event()

    def worker(seed):
        r = random.Random(seed)
        live = []
        try:
            while not stop.is_set():
                t = torch.zeros(1)
                cache.put(t, ("k", seed), (seed, id(t)))
                live.append(t)
                if len(live) > 3:
                    live.pop(r.randrange(len(live)))
                for x in live:
                    hit = cache.get(x, ("k", seed))
                    if hit is not None and hit != (seed, id(x)):
                        errors.append(f"wrong entry for thread {seed}")
        except Exception as e:  # noqa: BLE001 - any exception here is the failure under test
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2 * WORKERS)]
    for t in threads:
        t.start()
    threading.Event().wait(4.0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_padding_free_layer_unpatched_in_flight_raises(monkeypatch):
    """unpatch() in another thread can take a layer's packed forward away between the encoder's
    install() and the layer call; HF's own forward then runs on the packed tokens with no mask (on
    transformers 5 it swallows the packed keyword): the call must raise, never return that."""
    transformers = pytest.importorskip("transformers")
    from fused_attn.integrations import packed_layers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(5, 97, (2, 12))
    mask = padding_mask(torch.tensor([12, 5]), 12).long()
    fused_attn.patch(model, padding_free=True)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)             # runs packed: installs every layer
    install = packed_layers.install

    def install_then_lose(layer):                             # the interleaving unpatch() can cause
        install(layer)
        packed_layers.remove(packed_layers.inner(layer))

    monkeypatch.setattr(packed_layers, "install", install_then_lose)
    with torch.inference_mode(), pytest.raises((RuntimeError, TypeError), match="did not run packed|unexpected"):
        model(input_ids=ids, attention_mask=mask)
    monkeypatch.setattr(packed_layers, "install", install)
    fused_attn.unpatch(model)
