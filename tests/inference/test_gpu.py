"""On CUDA: the CUDA-graph decode equals eager decode bit for bit (issue 16, item 4). Skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from tiny.families import make_config, randomize_
from velotune.inference import SamplingParams, generate_batch
from velotune.inference import engine
from velotune.lora import get_peft_model
from velotune.models import model_class_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_graph_decode_equals_eager_bit_for_bit(family):
    cfg = make_config(family)
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg)
    randomize_(model)
    model.max_seq_length = 64
    model = get_peft_model(model.to("cuda", torch.bfloat16), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, n=3, max_tokens=20, logprobs=0)
    runs = []
    for graphs in (True, False):
        engine.release(model)
        seqs = engine.generate(model, prompts, params, eos_ids=set(), use_graphs=graphs)
        runs.append([(s.tokens, s.logprobs) for s in seqs])
    assert runs[0] == runs[1]
    greedy = generate_batch(model, prompts, SamplingParams(temperature=0, max_tokens=12))
    assert all(len(o.outputs[0].token_ids) == 12 for o in greedy)
