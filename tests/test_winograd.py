"""models/winograd.py and models/conv3x3.py: Winograd F(m×m, 3×3) against the convolution's definition."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models import conv3x3 as conv3x3_module
from latentforge.models import winograd
from latentforge.models.conv3x3 import conv3x3, winograd_tile
from latentforge.models.winograd import matrices, winograd_conv3x3, workspace


@pytest.mark.parametrize("m", sorted(winograd.POINTS))
def test_one_dimensional_minimal_filtering_is_exact(m):
    # Aᵀ[(G g) ⊙ (Bᵀ d)] must equal the correlation y_i = Σ_k g_k d_{i+k} (Lavin & Gray 2016, eq. 6) for any
    # d and g: checked on the basis vectors (which pins every entry of the bilinear map) in float64, where
    # the matrices' entries are exact dyadic or small rationals: 1e-13 allows their rounding only.
    bt, g, at = matrices(m)
    n = m + 2
    assert bt.shape == (n, n) and g.shape == (n, 3) and at.shape == (m, n)
    for k in range(3):
        for j in range(n):
            got = at @ (g[:, k] * bt[:, j])  # y for g = e_k, d = e_j
            want = torch.tensor([float(j == i + k) for i in range(m)], dtype=torch.float64)
            assert (got - want).abs().max() <= 1e-13, (m, k, j)


# float64: Winograd and the direct convolution differ by rounding only (~1e-15 of outputs of order 1); an
# indexing error (a wrong tile, window, edge or band) gives differences of order 1.
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (1, 3, 7, 13), (3, 4, 1, 1), (1, 2, 2, 5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_direct_convolution_in_float64(m, shape, memory_format, bias):
    g = torch.Generator().manual_seed(sum(shape) + m)
    x = torch.randn(*shape, dtype=torch.float64, generator=g).contiguous(memory_format=memory_format)
    w = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g) if bias else None
    got = winograd_conv3x3(x, w, b, m)
    want = F.conv2d(x, w, b, padding=1)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-12
    cl = memory_format == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1
    assert got.is_contiguous(memory_format=torch.channels_last) if cl else got.is_contiguous()


@pytest.mark.parametrize("m", [2, 4])
def test_bands_of_tile_rows_give_the_same_result(m, monkeypatch):
    # Large maps go in bands of tile rows (BAND_BYTES); a band of one tile row must change nothing.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    whole = winograd_conv3x3(x, w, None, m)
    monkeypatch.setattr(winograd, "BAND_BYTES", 1)
    with workspace():
        banded = winograd_conv3x3(x, w, None, m)
    assert (banded - whole).abs().max() <= 1e-12
    assert (whole - F.conv2d(x, w, padding=1)).abs().max() <= 1e-12


# float32 error, relative to the largest output, for 256 input channels with unit-variance inputs and
# weights ~ N(0, 1/(9·C_in)): measured 5.2e-6 (F(4,3)), 7.0e-7 (F(2,3)), 2.9e-7 (direct). The bounds allow
# ~2× that; the usual points {0, ±1, ±2} give 1.25e-5 for F(4,3) and fail.
@pytest.mark.parametrize("m, bound", [(2, 1.5e-6), (4, 1e-5)])
def test_float32_error_against_the_exact_result(m, bound):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 256, 16, 16, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g) / (3 * 256**0.5)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    with workspace():
        got = winograd_conv3x3(x, w, None, m)
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() / exact.abs().max() <= bound


def test_workspace_reuse_leaves_earlier_outputs_alone():
    # the outputs are fresh tensors, never views of the shared buffer that the next call overwrites
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(1, 4, 9, 9, generator=g), torch.randn(2, 4, 20, 20, generator=g)
    w = torch.randn(4, 4, 3, 3, generator=g)
    with workspace():
        y1 = winograd_conv3x3(x1, w, None, 4)
        y1_copy = y1.clone()
        winograd_conv3x3(x2, w, None, 4)
        winograd_conv3x3(x1 * 2, w, None, 2)
    assert torch.equal(y1, y1_copy)
    assert not winograd.in_workspace()


def test_threads_have_their_own_workspace():
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(1, 8, 24, 24, dtype=torch.float64, generator=g) for _ in range(4)]
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=g)
    results = {}

    def work(i):
        with workspace():
            for _ in range(20):
                results[i] = winograd_conv3x3(xs[i], w, None, 4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert (results[i] - F.conv2d(x, w, padding=1)).abs().max() <= 1e-12


def test_conv3x3_takes_winograd_only_where_it_pays(monkeypatch):
    wide = nn.Conv2d(256, 256, 3, padding=1)
    narrow = nn.Conv2d(128, 256, 3, padding=1)
    strided = nn.Conv2d(256, 256, 3, padding=1, stride=2)
    x = torch.zeros(2, 256, 16, 16)
    assert winograd_tile(wide, x) == 0  # outside a workspace: the direct kernel
    with workspace():
        assert winograd_tile(wide, x) == 2  # 512 pixels: F(2,3)
        assert winograd_tile(wide, torch.zeros(2, 256, 32, 32)) == 4  # 2048 pixels: F(4,3)
        assert winograd_tile(wide, torch.zeros(2, 256, 8, 8)) == 0  # 128 pixels: the GEMM path
        assert winograd_tile(narrow, torch.zeros(2, 128, 16, 16)) == 0
        assert winograd_tile(strided, x) == 0
        assert winograd_tile(wide, x.double()) == 0
        assert winograd_tile(wide, x.bfloat16()) == 0

    # and the result is conv(x) within the float32 bound above, on the path it takes
    monkeypatch.setattr(conv3x3_module, "WINOGRAD_MIN_CHANNELS", 8)
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 32, 32)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.inference_mode(), workspace():
        assert winograd_tile(conv, x) == 4
        got = conv3x3(conv, x)
    assert (got.double() - want).abs().max() / want.abs().max() <= 1e-5


def test_conv3x3_keeps_the_module_call_for_training_and_hooks(monkeypatch):
    monkeypatch.setattr(conv3x3_module, "WINOGRAD_MIN_CHANNELS", 8)
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 32, 32)
    with workspace():
        assert torch.equal(conv3x3(conv, x), conv(x))  # grad enabled: the module, bit for bit
        calls = []
        conv.register_forward_hook(lambda mod, args, out: calls.append(1))
        with torch.inference_mode():
            assert torch.equal(conv3x3(conv, x), conv(x))  # hooked: the module, and the hook runs
    assert len(calls) == 2
