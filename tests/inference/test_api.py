"""The engine's public API as the docs use it: fast_generate, SamplingParams, save_lora/load_lora,
for_inference + generate with a streamer, from_pretrained's vLLM arguments; and its bad-input errors."""

from __future__ import annotations

import pytest
import torch
from transformers import TextStreamer

import velotune
from tiny.families import make_config, randomize_
from velotune import FastLanguageModel, SamplingParams
from velotune.inference import engine, generate_batch
from velotune.inference.cache import StaticKVCache
from velotune.lora import get_peft_model
from velotune.models import model_class_for

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def _tiny_peft(family="llama", r=4, seed=1, hidden=None):
    cfg = make_config(family)
    if hidden:
        cfg.hidden_size, cfg.head_dim = hidden, hidden // cfg.num_attention_heads
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg)
    randomize_(model)
    model.max_seq_length = 64
    peft = get_peft_model(model, r=r, lora_alpha=8, use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft


def _greedy(model, **kwargs):
    return [o.outputs[0].token_ids for o in generate_batch(model, PROMPTS, SamplingParams(temperature=0, max_tokens=8),
                                                           **kwargs)]


def test_save_lora_then_lora_request_generates_with_that_adapter(tmp_path):
    model = _tiny_peft()
    trained = _greedy(model)
    model.save_lora(tmp_path / "grpo_saved_lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # the model's own adapter now does nothing
    base = _greedy(model)
    assert base != trained
    request = model.load_lora(tmp_path / "grpo_saved_lora")
    assert isinstance(request, velotune.LoRARequest)
    assert _greedy(model, lora_request=request) == trained
    assert _greedy(model, lora_request=request) == trained  # loaded once, weights copied in place
    assert _greedy(model) == base  # the model's own adapter is active again
    assert model.active_adapter == "default"
    assert all(p.requires_grad == ("lora_" in n and ".default." in n) for n, p in model.named_parameters())


def test_n_samples_share_a_prefill_and_seed_reproduces():
    model = _tiny_peft()
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, logprobs=1)
    first = generate_batch(model, PROMPTS, params)
    again = generate_batch(model, PROMPTS, params)
    assert [len(r.outputs) for r in first] == [4, 4]
    assert [[o.token_ids for o in r.outputs] for r in first] == [[o.token_ids for o in r.outputs] for r in again]
    assert len({tuple(o.token_ids) for o in first[0].outputs}) > 1  # independent draws
    assert all(len(o.logprobs) == len(o.token_ids) and all(lp <= 0 for lp in o.logprobs)
               for r in first for o in r.outputs)


def test_logprobs_equal_the_model_forward():
    """GRPO's old log-probabilities: log p(token | prefix) under the raw logits of a plain forward."""
    model = _tiny_peft()
    out = generate_batch(model, PROMPTS[:1], SamplingParams(temperature=1.0, seed=0, max_tokens=6, logprobs=0))[0]
    tokens = out.outputs[0].token_ids
    ids = torch.tensor([PROMPTS[0] + tokens])
    model.eval()
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, len(PROMPTS[0]) - 1:-1]
    expected = logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.outputs[0].logprobs), expected, atol=1e-4)


class _Collect(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.text += text


def test_for_inference_generate_streams_the_same_text(smollm2):
    _, tokenizer = smollm2
    model = _tiny_peft()
    FastLanguageModel.for_inference(model)
    ids = torch.tensor([PROMPTS[0]])
    streamer = _Collect(tokenizer)
    out = model.generate(input_ids=ids, streamer=streamer, max_new_tokens=12, use_cache=True, do_sample=False)
    assert engine.resident_of(model) is not None  # it ran on the engine, which keeps its cache
    assert streamer.text == tokenizer.decode(out[0, ids.shape[1]:])
    plain = model.generate(input_ids=ids, max_new_tokens=12, use_cache=True, do_sample=False)
    assert plain.tolist() == out.tolist()
    FastLanguageModel.for_training(model)
    assert engine.resident_of(model) is None  # training gets the memory back


@pytest.mark.slow
def test_docs_fast_generate_snippet_on_smollm2(smollm2):
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    sampling_params = SamplingParams(temperature=0, top_p=0.95, max_tokens=24)
    fast_generate = model.fast_generate  # the docs' call on the model from_pretrained returned
    output = fast_generate([text], sampling_params=sampling_params, lora_request=None)[0].outputs[0].text
    assert "Paris" in output
    stopped = fast_generate(text, sampling_params=SamplingParams(temperature=0, max_tokens=24, stop=["Paris"]))
    first = stopped[0].outputs[0]
    assert first.finish_reason == "stop" and first.stop_reason == "Paris" and "Paris" not in first.text


def test_from_pretrained_takes_vllm_arguments(smollm2_folder):
    model, _ = FastLanguageModel.from_pretrained(smollm2_folder, load_in_4bit=False, device_map="cpu",
                                                 max_seq_length=256, fast_inference=True,
                                                 gpu_memory_utilization=0.6, max_lora_rank=32)
    settings = model.generation_engine.settings
    assert (settings.fast_inference, settings.gpu_memory_utilization, settings.max_lora_rank) == (True, 0.6, 32)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        FastLanguageModel.from_pretrained(smollm2_folder, load_in_4bit=False, device_map="cpu",
                                          gpu_memory_utilization=1.5)


def test_prompt_longer_than_context_names_both_numbers():
    model = _tiny_peft()
    with pytest.raises(ValueError, match=r"prompt 0 has 70 tokens but the model's context is 64"):
        generate_batch(model, [[5] * 70], SamplingParams(max_tokens=4))
    out = generate_batch(model, [[5] * 70], SamplingParams(max_tokens=4, truncate_prompt_tokens=32))
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_lora_requests(tmp_path):
    model = _tiny_peft()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        model.load_lora(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model.load_lora(tmp_path / "empty")
    _tiny_peft(r=128).save_lora(tmp_path / "big")
    with pytest.raises(ValueError, match="max_lora_rank=64"):
        model.load_lora(tmp_path / "big")
    _tiny_peft(hidden=32).save_lora(tmp_path / "other")
    with pytest.raises(ValueError, match="another base model"):
        model.load_lora(tmp_path / "other")


def test_cache_that_cannot_fit_says_what_to_lower():
    with pytest.raises(MemoryError, match="lower max_tokens, n or the number of prompts"):
        StaticKVCache([(1 << 20, 1 << 20)], rows=1 << 10, length=1 << 10, dtype=torch.float32,
                      device=torch.device("cpu"))


def test_float8_kv_cache_halves_the_cache_and_still_generates():
    from velotune.inference import GenerationEngine, InferenceSettings

    model = _tiny_peft()
    model.get_base_model().generation_engine = GenerationEngine(InferenceSettings(float8_kv_cache=True))
    params = SamplingParams(temperature=0, max_tokens=8)
    fp8 = [o.outputs[0].token_ids for o in generate_batch(model, PROMPTS, params)]
    fp8_bytes = engine.resident_of(model).cache.nbytes
    model.get_base_model().generation_engine = GenerationEngine()
    full = [o.outputs[0].token_ids for o in generate_batch(model, PROMPTS, params)]
    assert engine.resident_of(model).cache.nbytes == 4 * fp8_bytes  # fp32 model here: 4 bytes -> 1
    same = sum(a == b for x, y in zip(fp8, full) for a, b in zip(x, y))
    assert same >= 8, f"fp8 cache {fp8} vs full {full}"  # e4m3 keeps 3 mantissa bits: the first tokens agree


def test_min_tokens_bans_eos_until_reached():
    model = _tiny_peft()
    free = _greedy(model)
    eos = free[0][1]  # greedy would produce this token second: make it the EOS
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[eos], logprobs=0)
    early = generate_batch(model, PROMPTS[:1], params)[0].outputs[0]
    assert early.token_ids == free[0][:2] and early.finish_reason == "stop"
    late = generate_batch(model, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8, min_tokens=4,
                                                              stop_token_ids=[eos], logprobs=0))[0].outputs[0]
    assert eos not in late.token_ids[:4] and len(late.token_ids) >= 4
    assert late.logprobs[0] == pytest.approx(early.logprobs[0])  # the raw model's log-probability


def test_lora_request_on_a_model_without_adapters(tmp_path):
    """A base model given a lora_request generates with it, and has no LoRA layers afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from velotune.inference import load_lora

    peft = _tiny_peft()
    trained = _greedy(peft)
    peft.save_lora(tmp_path / "adapter")
    cfg = make_config("llama")
    torch.manual_seed(0)
    base = model_class_for(cfg)(cfg)
    randomize_(base)
    base.max_seq_length = 64
    before = _greedy(base)
    assert _greedy(base, lora_request=load_lora(base, tmp_path / "adapter")) == trained
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert _greedy(base) == before


def test_batch_with_finishing_rows_equals_each_prompt_alone():
    """Rows stop at different steps (the batch is compacted into smaller buckets meanwhile, penalties
    and all): every completion equals that prompt generated alone."""
    model = _tiny_peft()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43]]
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5)
    alone = [generate_batch(model, [p], params)[0].outputs[0].token_ids for p in prompts]
    stops = sorted({ids[k] for k, ids in zip((2, 5, 8, 3, 11), alone)})  # tokens that end rows at different steps
    stopped = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5,
                             stop_token_ids=stops)
    alone = [generate_batch(model, [p], stopped)[0].outputs[0].token_ids for p in prompts]
    together = [r.outputs[0].token_ids for r in generate_batch(model, prompts, stopped)]
    assert together == alone
    assert len({len(ids) for ids in alone}) > 2  # rows did finish at different steps


def test_a_causal_lm_built_without_from_pretrained_says_what_fast_generate_needs():
    from tiny.families import make_config

    from velotune.models import model_class_for

    config = make_config("llama")
    model = model_class_for(config)(config)
    with pytest.raises(AttributeError, match="FastLanguageModel.from_pretrained"):
        model.fast_generate([[1, 2, 3]])
    ids = torch.tensor([[1, 5, 7]])
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 5)  # transformers' loop

