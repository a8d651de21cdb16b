"""NF4 dequantization kernel: bit for bit against bitsandbytes' dequantize_4bit (its CPU path
runs here; on the GPU machine its CUDA path) and against our quant/nf4.py."""

import gc

import pytest
import torch

from velotune.kernels import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_weight
from velotune.kernels import nf4 as nf4_module
from velotune.quant import NF4_CODE, quantize_nf4
from velotune.quant import dequantize_nf4_state
from velotune.quant.linear import to_linear4bit

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402
from tiny.bnb_reference import bnb_dequantize_4bit  # noqa: E402

# aligned with several nested absmax blocks (320 blocks of 64 > 256); odd: partial block, odd count
SHAPES = [(128, 160), (37, 77)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kwargs(state, dtype=None):
    kwargs = dict(blocksize=state.blocksize, shape=state.shape, dtype=dtype or state.dtype)
    if state.nested:
        kwargs.update(
            nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code, offset=state.offset,
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    return kwargs


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_bit_exact_vs_bitsandbytes(shape, dtype, double_quant, device):
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    want = bnb_dequantize_4bit(packed, state)
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want)
    reference = dequantize_nf4_reference(packed, state.absmax, state.code, **_kwargs(state))
    assert torch.equal(reference, want)


@pytest.mark.parametrize("shape", SHAPES, ids=["aligned", "odd"])
def test_bit_exact_vs_our_quantizer_and_weight_helper(shape, device):
    w = torch.randn(shape, device=device, dtype=torch.bfloat16)
    packed, state = quantize_nf4(w, compress_statistics=True)
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert torch.equal(got, dequantize_nf4_state(packed, state))
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
    module = to_linear4bit(linear)
    want = dequantize_nf4_state(module.weight.data, module.weight.quant_state)
    assert torch.equal(dequantize_nf4_weight(module, use_triton=True), want)
    assert torch.equal(dequantize_nf4_weight(module.weight, use_triton=True), want)


def test_other_output_dtype_and_quant_storage(device):
    """Storage other than uint8 (bytes reinterpreted) and a compute dtype other than the original."""
    w = torch.randn(48, 64, device=device)
    packed, state = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
    )
    want = bnb_dequantize_4bit(packed, state).to(torch.bfloat16)  # fp32 product, one rounding
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state, torch.bfloat16), use_triton=True)
    assert torch.equal(got, want)


def test_bad_inputs_are_named():
    w = torch.randn(8, 64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    with pytest.raises(ValueError, match="need 4 absmax entries, got 8"):
        dequantize_nf4(packed, state.absmax, state.code, **{**_kwargs(state), "blocksize": 128})
    with pytest.raises(ValueError, match="needs nested_absmax, nested_quant_map and offset together"):
        dequantize_nf4(
            packed, state.absmax, state.code, nested_absmax=state.state2.absmax, shape=(8, 64), dtype=torch.float32
        )
    with pytest.raises(ValueError, match="carries no bitsandbytes quant_state"):
        dequantize_nf4_weight(torch.nn.Linear(4, 4))


# Tiles hold 4096 values: "tail" spans several tiles and ends mid-block on an odd count (masked
# path); "even" fills whole tiles for every blocksize below (the unmasked EVEN path).
TILE_SHAPES = {"tail": (41, 229), "even": (64, 128)}


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("tiling", list(TILE_SHAPES))
def test_blocksizes_and_tails_bit_exact(tiling, blocksize, double_quant, device):
    shape = TILE_SHAPES[tiling]
    w = torch.randn(shape, device=device) * 0.05
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    for dtype in DTYPES:
        want = bnb_dequantize_4bit(packed, state).to(dtype)  # fp32 product, one rounding (as ours)
        got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state, dtype), use_triton=True)
        assert got.dtype == dtype and got.shape == torch.Size(shape)
        assert torch.equal(got, want), (dtype, (got != want).sum().item())
        assert torch.equal(got, dequantize_nf4_reference(packed, state.absmax, state.code, **_kwargs(state, dtype)))


def _random_nf4(n, blocksize, nested_blocksize, nested, device):
    """Arbitrary packed bytes and scales (not from a quantizer): every code, blocksizes bitsandbytes refuses."""
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=device)
    if not nested:
        return dict(packed=packed, absmax=torch.rand(n_blocks, device=device), quant_map=NF4_CODE.to(device))
    return dict(
        packed=packed, absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device),
        quant_map=NF4_CODE.to(device), nested_absmax=torch.rand(-(-n_blocks // nested_blocksize), device=device),
        nested_quant_map=torch.randn(256, device=device), offset=torch.tensor(0.0123, device=device),
        nested_blocksize=nested_blocksize,
    )  # fmt: skip


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize(
    "blocksize, nested_blocksize, n", [(16, 256, 5001), (16, 3, 4096), (512, 100, 9999), (4096, 2, 8193)]
)
def test_other_blocksizes_against_reference(blocksize, nested_blocksize, n, nested, device):
    args = _random_nf4(n, blocksize, nested_blocksize, nested, device)
    if not nested:
        nested_blocksize = 256
    for dtype in DTYPES:
        want = dequantize_nf4_reference(**args, blocksize=blocksize, shape=(n,), dtype=dtype)
        got = dequantize_nf4(**args, blocksize=blocksize, shape=(n,), dtype=dtype, use_triton=True)
        assert torch.equal(got, want), (dtype, (got != want).sum().item())


def test_blocksize_the_kernel_cannot_tile(device):
    """Not a power of two >= 16: use_triton=True names the allowed values; the default falls back."""
    args = _random_nf4(300, 48, 256, True, device)
    want = dequantize_nf4_reference(**args, blocksize=48, shape=(300,), dtype=torch.float32)
    assert torch.equal(dequantize_nf4(**args, blocksize=48, shape=(300,), dtype=torch.float32), want)
    with pytest.raises(ValueError, match="power of two >= 16.*got 48.*use_triton=None/False"):
        dequantize_nf4(**args, blocksize=48, shape=(300,), dtype=torch.float32, use_triton=True)


def _linear4bit(shape, device, seed, double_quant=True):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.bfloat16)
    return to_linear4bit(linear) if double_quant else to_linear4bit(linear, compress_statistics=False)


def _expected(param, state):
    return dequantize_nf4_state(param.data, state)


def test_weight_cache_reuses_the_launch_and_never_serves_stale_results(device):
    module = _linear4bit((40, 96), device, seed=1)
    param, state = module.weight, module.weight.quant_state
    first = dequantize_nf4_weight(module, use_triton=True)
    assert torch.equal(first, _expected(param, state))
    entry = nf4_module._CACHE[id(state)]
    assert torch.equal(dequantize_nf4_weight(param, use_triton=True), first)
    assert nf4_module._CACHE[id(state)] is entry  # a hit: nothing re-validated or re-prepared

    # 1) the packed bytes swapped under the same QuantState (param.data = ...): new address, rebuilt
    other = _linear4bit((40, 96), device, seed=2)
    param.data = other.weight.data.clone()
    got = dequantize_nf4_weight(module, use_triton=True)
    assert not torch.equal(got, first)
    assert torch.equal(got, _expected(param, state))
    # 2) the bytes edited in place (same address): never cached, so seen at once
    param.data.copy_(other.weight.data)
    assert torch.equal(dequantize_nf4_weight(module, use_triton=True), _expected(param, state))
    # 3) the state's tables replaced, one at a time (QuantState.to(device) replaces them all)
    before = dequantize_nf4_weight(module, use_triton=True)
    state.absmax = state.absmax.flip(0).contiguous()
    got = dequantize_nf4_weight(module, use_triton=True)
    assert not torch.equal(got, before) and torch.equal(got, _expected(param, state))
    state.state2.absmax = state.state2.absmax * 2
    got, before = dequantize_nf4_weight(module, use_triton=True), got
    assert not torch.equal(got, before) and torch.equal(got, _expected(param, state))
    state.offset = state.offset + 0.5
    got, before = dequantize_nf4_weight(module, use_triton=True), got
    assert not torch.equal(got, before) and torch.equal(got, _expected(param, state))
    state.dtype = torch.float16  # the compute dtype changed
    got = dequantize_nf4_weight(module, use_triton=True)
    assert got.dtype == torch.float16 and torch.equal(got, _expected(param, state))
    # 4) re-quantized to a new Params4bit (new QuantState): its own entry, the old one freed with it
    module.weight = to_linear4bit(torch.nn.Linear(96, 40, bias=False, device=device)).weight
    want = _expected(module.weight, module.weight.quant_state)
    assert torch.equal(dequantize_nf4_weight(module, use_triton=True), want)


def test_weight_cache_entry_dies_with_its_weight(device):
    module = _linear4bit((16, 64), device, seed=4)
    dequantize_nf4_weight(module, use_triton=True)
    key = id(module.weight.quant_state)
    assert key in nf4_module._CACHE
    del module  # the module and its Params4bit held the only references to the QuantState
    gc.collect()
    assert key not in nf4_module._CACHE


def test_weight_cache_without_double_quant_and_other_storage(device):
    module = _linear4bit((24, 80), device, seed=3, double_quant=False)
    want = _expected(module.weight, module.weight.quant_state)
    for _ in range(2):
        assert torch.equal(dequantize_nf4_weight(module, use_triton=True), want)
    linear = torch.nn.Linear(80, 24, bias=False, device=device, dtype=torch.bfloat16)
    param = to_linear4bit(linear, quant_storage=torch.bfloat16).weight
    assert param.data.dtype == torch.bfloat16
    want = dequantize_nf4_state(param.data, param.quant_state)
    for _ in range(2):
        assert torch.equal(dequantize_nf4_weight(param, use_triton=True), want)
    assert torch.equal(dequantize_nf4_weight(param, use_triton=False), want)  # the PyTorch reference, same bits


def test_bench_nf4_section_dry_run(capsys):
    """bench/bench_kernels.py's NF4 rows (GB/s, host time per call) build and run (here interpreted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_nf4", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--ops", "dequantize_nf4"])
    out = capsys.readouterr().out
    assert "| dequantize_nf4 | - | torch reference |" in out
    assert "| implementation | ms | GB/s |" in out and "| bitsandbytes |" in out
    assert "| velotune dequantize_nf4_weight (cached) |" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
def test_real_size_gpu(double_quant):
    w = (torch.randn(14336, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    got = dequantize_nf4(packed, state.absmax, state.code, **_kwargs(state), use_triton=True)
    assert torch.equal(got, bnb_dequantize_4bit(packed, state))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(14336, 4096), (4095, 14337)], ids=["aligned", "odd"])
def test_real_size_weight_path_gpu(shape):
    """The QLoRA hot path (cached launch) on a real Linear4bit, first call and cache hit."""
    linear = torch.nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    module = to_linear4bit(linear)
    want = bnb_dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.equal(dequantize_nf4_weight(module), want)
    assert torch.equal(dequantize_nf4_weight(module), want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_weight_on_another_gpu_than_the_current_one():
    """device_map over GPUs: the launch runs on the weight's GPU whatever device is current."""
    linear = torch.nn.Linear(256, 192, bias=False, device="cuda:1", dtype=torch.bfloat16)
    module = to_linear4bit(linear)
    want = bnb_dequantize_4bit(module.weight.data, module.weight.quant_state)
    with torch.cuda.device(0):
        for _ in range(2):
            got = dequantize_nf4_weight(module)
            assert got.device == torch.device("cuda:1") and torch.equal(got, want)
