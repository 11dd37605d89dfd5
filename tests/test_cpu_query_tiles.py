"""The C++ CPU kernel's query-tile height under a local window (query_tile_rows, csrc/cpu_attn.h):
16-, 32- or 64-row tiles chosen from the band's width.  The tile height is visible in the kernel's
visited-tile counts; every height must give the oracle's result (docs/design.md tolerance rule) at
the rule's thresholds, with sequence lengths that no tile height divides, padding, block maps and
short packed sequences."""
import math

import pytest
import torch

from fused_attn import backends
from fused_attn.masks import reduce_mask
from test_backward import check_backward
from test_forward import check_forward
from test_varlen import check_varlen


@pytest.fixture
def cpu():
    why = backends.reasons("cpu", torch.empty(1, 1, 1, 16))
    if why:
        pytest.skip(f"backend 'cpu' unavailable: {'; '.join(why)}")
    return "cpu", "cpu"


def expected_rows(window, causal):
    """The rule, restated: the largest of 16 / 32 / 64 rows at most an eighth of the band's width
    (16 at least); 64 where the band is open on a side."""
    left, right = window[0], 0 if causal else window[1]
    if left < 0 or right < 0:
        return 64
    w = left + right + 1
    return 16 if w < 256 else 32 if w < 512 else 64


# (window, causal) on both sides of each threshold: w = 255 | 256, 511 | 512; ModernBERT's 129;
# one-sided bands keep 64.
RULE_CASES = [((127, 127), False), ((127, 128), False), ((255, 255), False), ((255, 256), False),
              ((64, 64), False), ((300, 0), True), ((-1, 10), False), ((40, -1), False), ((-1, -1), True)]


@pytest.mark.parametrize("window,causal", RULE_CASES)
def test_rule_picks_the_tile_height(cpu, window, causal):
    """An interior 64-row query block's visited key tiles: (64 / bm) query tiles of bm rows, each
    walking ceil((bm + left + right) / 64) key tiles from its band's first key."""
    S, qb = 1024, 8                                    # rows 512..575: the band lies inside [0, S)
    q = torch.randn(1, 1, S, 16)
    red = reduce_mask(None, 1, 1, S, S)
    _, _, visited = backends.get("cpu").forward(q, q, q, red, causal=causal, dropout_p=0.0, scale=0.25,
                                                stats=True, window_size=window)
    rows = expected_rows(window, causal)
    left, right = window[0], 0 if causal else window[1]
    left = qb * 64 if left < 0 else left                # an open side reaches the sequence's edge
    right = S - (qb + 1) * 64 if right < 0 else right
    want = 64 // rows * math.ceil((rows + left + right) / 64)
    assert visited[0, 0, qb].item() == want, f"window {window}, causal {causal}: expected {rows}-row tiles"


# Sq / Sk that no tile height divides (and Sq != Sk: the band's offset), windows on both sides of
# the thresholds (w = 255 | 256: 16 | 32 rows, 511 | 512: 32 | 64) and narrower ones.
NUMERIC_CASES = [
    (300, 300, (127, 127), False, "pad-right"),
    (97, 333, (127, 128), False, "pad-holes"),
    (333, 97, (255, 255), False, "pair"),
    (300, 300, (255, 256), False, "4d-heads"),
    (150, 150, (64, 64), False, "pad-left"),
    (150, 170, (63, 63), False, "none"),
    (170, 150, (63, 64), False, "pad-right"),
    (150, 170, (70, 0), True, "none"),
    (41, 41, (3, 5), False, "hf-finfo-additive"),
]


@pytest.mark.parametrize("sq,sk,window,causal,mask", NUMERIC_CASES)
def test_tiles_match_the_oracle(cpu, sq, sk, window, causal, mask):
    check_forward(cpu, 2, 2, sq, sk, 32, torch.float16, mask=mask, causal=causal, window_size=window)
    check_backward(cpu, 2, 2, sq, sk, 32, torch.float32, mask=mask, causal=causal, window_size=window)


@pytest.mark.parametrize("window", [(127, 128), (20, 20), (0, 0)])
def test_tiles_varlen_short_sequences(cpu, window):
    """Packed sequences shorter than one tile, one token, empty, cross-length, and one that spans
    several 64-row blocks with a ragged end."""
    check_varlen(cpu, [1, 15, 17, 0, 33, 200, 9], [1, 15, 17, 5, 40, 200, 0], 2, 32, torch.float16,
                 window_size=window)


@pytest.mark.parametrize("rows", ["16", "32", "64"])
def test_forced_tile_heights_match_the_oracle(cpu, monkeypatch, rows):
    """FUSED_ATTN_CPU_QUERY_ROWS forces a height on any call, the dense path included."""
    monkeypatch.setenv("FUSED_ATTN_CPU_QUERY_ROWS", rows)
    check_backward(cpu, 1, 2, 77, 90, 32, torch.float32, mask="pad-right")
    check_backward(cpu, 1, 2, 77, 90, 32, torch.float32, mask="pair", window_size=(9, 30))
