"""`get_chat_template` as the seed's "Chat Templates" page uses it, and its error cases."""

import warnings

import pytest
from datasets import Dataset

from velotune.chat_templates import get_chat_template, ollama_template_for

SHAREGPT = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
SEED_CONVOS = [
    [{"from": "human", "value": "Hi there!"}, {"from": "gpt", "value": "Hi how can I help?"},
     {"from": "human", "value": "What is 2+2?"}],
    [{"from": "human", "value": "What's your name?"}, {"from": "gpt", "value": "I'm Daniel!"},
     {"from": "human", "value": "Ok! Nice!"}, {"from": "gpt", "value": "What can I do for you?"},
     {"from": "human", "value": "Oh nothing :)"}],
]


def test_seed_snippet_sharegpt_chatml(tokenizer):
    tokenizer = get_chat_template(tokenizer, chat_template="chatml", mapping=SHAREGPT, map_eos_token=True)

    def formatting_prompts_func(examples):
        convos = examples["conversations"]
        texts = [tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=False) for convo in convos]
        return {"text": texts}

    dataset = Dataset.from_dict({"conversations": SEED_CONVOS}).map(formatting_prompts_func, batched=True)
    assert dataset[0]["text"] == ("<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHi how can I help?"
                                  "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    assert dataset[1]["text"].count("<|im_start|>assistant\n") == 2


def test_mapping_also_accepts_role_content(tokenizer):
    get_chat_template(tokenizer, "chatml", mapping=SHAREGPT)
    plain = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_default_keeps_the_tokenizers_own_template(tokenizer):
    own = tokenizer.chat_template
    assert get_chat_template(tokenizer).chat_template == own
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_own_template_with_mapping_and_system(tokenizer):
    get_chat_template(tokenizer, mapping=SHAREGPT, system_message="Answer in French.")
    text = tokenizer.apply_chat_template(SEED_CONVOS[0][:2], tokenize=False)
    assert text == ("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
                    "<|im_start|>assistant\nHi how can I help?<|im_end|>\n")


def test_map_eos_token_replaces_a_missing_end_token(tokenizer):
    """SmolLM2 has no <|eot_id|>: with map_eos_token the template writes the EOS instead, and the
    turn ends in the single EOS id (no new tokens, no resize)."""
    vocab_size = len(tokenizer)
    get_chat_template(tokenizer, "llama-3", map_eos_token=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                         tokenize=False)
    assert "<|eot_id|>" not in text and text.endswith("Yo<|im_end|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(tokenizer) == vocab_size


def test_map_eos_token_makes_an_existing_end_token_the_eos(tokenizer):
    tokenizer.eos_token = "<|endoftext|>"  # a base-model setup: <|im_end|> exists but is not EOS
    get_chat_template(tokenizer, "chatml", map_eos_token=True)
    assert tokenizer.eos_token == "<|im_end|>"


def test_without_map_eos_token_a_missing_end_token_warns(tokenizer):
    with pytest.warns(UserWarning, match="'<\\|eot_id\\|>', which is not a token of this tokenizer"):
        get_chat_template(tokenizer, "llama-3", map_eos_token=False)
    assert "<|eot_id|>" in tokenizer.chat_template


def test_system_message_replaces_default(tokenizer):
    get_chat_template(tokenizer, "alpaca", system_message="You are a pirate.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("You are a pirate.\n\n### Instruction:\nHi")


UNSLOTH_TEMPLATE = (
    "{{ bos_token }}{{ 'You are a helpful assistant to the user\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '>>> User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '>>> Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '>>> Assistant: ' }}{% endif %}"
)


def test_seed_custom_tuple(tokenizer):
    tokenizer = get_chat_template(tokenizer, chat_template=(UNSLOTH_TEMPLATE, "eos_token"), mapping=SHAREGPT,
                                  map_eos_token=True)
    text = tokenizer.apply_chat_template(SEED_CONVOS[0], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>You are a helpful assistant to the user\n>>> User: Hi there!\n>>> Assistant: "
                    "Hi how can I help?<|im_end|>\n>>> User: What is 2+2?\n>>> Assistant: ")


def test_custom_tuple_with_literal_eos_is_mapped(tokenizer):
    template = UNSLOTH_TEMPLATE.replace("eos_token", "'<|END|>'")
    get_chat_template(tokenizer, (template, "<|END|>"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                         tokenize=False)
    assert "b<|im_end|>" in text and "<|END|>" not in text


def test_custom_tuple_errors(tokenizer):
    with pytest.raises(ValueError, match="must appear inside the template"):
        get_chat_template(tokenizer, (UNSLOTH_TEMPLATE, "<|nowhere|>"))
    with pytest.raises(ValueError, match="never uses the `eos_token` variable"):
        get_chat_template(tokenizer, ("{{ messages[0]['content'] }}", "eos_token"))
    with pytest.raises(TypeError, match="registry name or a \\(template, eos_token\\) tuple"):
        get_chat_template(tokenizer, (UNSLOTH_TEMPLATE,))
    with pytest.raises(ValueError, match="Unknown chat template"):
        get_chat_template(tokenizer, "no-such-template")


def test_ollama_template_survives_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    get_chat_template(tokenizer, "llama-3", system_message="Be kind.")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ollama = ollama_template_for(reloaded)
    assert ollama.system == "Be kind."
    assert ollama.stop_tokens == ("<|im_end|>",)  # <|eot_id|> mapped to SmolLM2's EOS, as in Jinja
    assert "<|eot_id|>" not in ollama.template and "<|im_end|>" in ollama.template


def test_ollama_template_needs_a_velotune_template(tokenizer):
    with pytest.raises(ValueError, match="not set by velotune.get_chat_template"):
        ollama_template_for(tokenizer)


def test_no_warning_for_the_common_path(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_chat_template(tokenizer, "chatml", mapping=SHAREGPT)
