"""Streaming load on CUDA (skipped without a GPU): the layers quantized on the GPU as they arrive have the
bytes of the whole model quantized there (bitsandbytes' CUDA rounding, int8 row scales, FP8), and the GPU's
peak during the load is the quantized model plus one 16-bit layer and one Linear's quantization scratch, not
the whole 16-bit model. The CPU twin (bytes, host-side bound): test_stream_load.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("bitsandbytes")

from velotune.quant import quantize_model_  # noqa: E402
from velotune.quant.fp8 import fp8_unavailable  # noqa: E402

from tiny.families import make_hf  # noqa: E402
from tiny.sharded import write_sharded  # noqa: E402

from .test_stream_load import DTYPE, WHOLE, _bytes  # noqa: E402
from .test_stream_load import _load as _load_on  # noqa: E402

CUDA = torch.device("cuda")
CASES = [("llama", "nf4"), ("phi3", "nf4"), ("qwen3", "nf4"), ("llama", "int8"), ("qwen2", "fp8")]


def _load(folder, quant):
    return _load_on(folder, quant, CUDA)


@pytest.mark.parametrize("family, quant", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_streamed_layers_equal_the_whole_model_quantized_on_cuda(tmp_path, family, quant):
    if quant == "fp8" and fp8_unavailable(CUDA):
        pytest.skip(fp8_unavailable(CUDA))
    write_sharded(make_hf(family), tmp_path, DTYPE)
    streamed = _load(tmp_path, quant)
    whole = _load(tmp_path, None)  # 16-bit on the GPU, then quantized there as one model
    WHOLE[quant](whole)
    expected, actual = whole.state_dict(), streamed.state_dict()
    assert list(actual) == list(expected)
    for name, value in expected.items():
        # bitsandbytes keeps its packed quant-state and int8 weight-format records on the CPU in both paths
        assert actual[name].device == value.device and actual[name].dtype == value.dtype, name
        assert torch.equal(_bytes(actual[name]), _bytes(value)), name


def test_gpu_peak_is_one_16bit_layer_above_the_quantized_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    layer_bytes = sum(p.numel() for p in reference.model.layers[0].parameters()) * 2  # bf16
    write_sharded(reference, tmp_path, DTYPE, shards=5)
    del reference
    # What quantizing the largest Linear alone costs above its 16-bit weight (the quantizer's own scratch).
    torch.cuda.empty_cache()
    big = torch.nn.Sequential(torch.nn.Linear(config.intermediate_size, config.hidden_size, bias=False,
                                              device=CUDA, dtype=DTYPE))
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    quantize_model_(big, skip_modules=(), compute_dtype=DTYPE)
    scratch = torch.cuda.max_memory_allocated() - start
    del big

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = _load(tmp_path, "nf4")
    final = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    whole_16bit = layer_bytes * config.num_hidden_layers
    print(f"16-bit layer {layer_bytes / 2**20:.1f} MiB, whole 16-bit {whole_16bit / 2**20:.1f} MiB, "
          f"quantizer scratch {scratch / 2**20:.1f} MiB, loaded {final / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert peak - final <= layer_bytes + scratch + 2**20, (peak, final, layer_bytes, scratch)
    assert peak < final + whole_16bit / 2  # loading whole first would hold all 16 layers in 16-bit
    del model
