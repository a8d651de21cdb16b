"""`to_sharegpt`, `standardize_sharegpt` and the {INPUT}/{OUTPUT}/{SYSTEM} `apply_chat_template`
as the seed's Llama-3/Ollama tutorial (sections 7-9) shows them."""

import math

import pytest
from datasets import Dataset

from velotune.chat_templates import apply_chat_template, standardize_sharegpt, to_sharegpt

TITANIC_PROMPT = ("[[The passenger embarked from {Embarked}.]] [[Their age is {Age}.]] [[Their fare is ${Fare}.]]")


def titanic():
    return Dataset.from_dict({"Embarked": ["S", None], "Age": [23.0, 18.0], "Fare": [math.nan, 7.25],
                              "Survived": ["died", "survived"]})


def test_titanic_optional_sections():
    """The seed's example: a missing column removes its whole [[...]] section."""
    ds = to_sharegpt(titanic(), merged_prompt=TITANIC_PROMPT, output_column_name="Survived")
    assert ds.column_names == ["conversations"]
    assert ds[0]["conversations"] == [{"from": "human", "value": "The passenger embarked from S. Their age is 23. "},
                                      {"from": "gpt", "value": "died"}]
    assert ds[1]["conversations"][0]["value"] == " Their age is 18. Their fare is $7.25."


def test_alpaca_merge_with_optional_input():
    ds = Dataset.from_dict({"instruction": ["Add", "Greet"], "input": ["1, 2", ""], "output": ["3", "Hello"]})
    out = to_sharegpt(ds, merged_prompt="{instruction}[[\nYour input is:\n{input}]]", output_column_name="output")
    assert out[0]["conversations"][0]["value"] == "Add\nYour input is:\n1, 2"
    assert out[1]["conversations"][0]["value"] == "Greet"


def test_conversation_extension_is_reproducible_and_multi_turn():
    ds = Dataset.from_dict({"q": [f"q{i}" for i in range(10)], "a": [f"a{i}" for i in range(10)]})
    one = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3, random_state=7)
    two = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3, random_state=7)
    other = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3, random_state=8)
    assert one["conversations"] == two["conversations"] and one["conversations"] != other["conversations"]
    assert len(one) == 10
    for i, convo in enumerate(one["conversations"]):
        assert [m["from"] for m in convo] == ["human", "gpt"] * 3
        assert convo[0]["value"] == f"q{i}"  # row i opens its own conversation
        for human, gpt in zip(convo[::2], convo[1::2]):  # each turn keeps its own row's answer
            assert gpt["value"] == "a" + human["value"][1:]


def test_to_sharegpt_errors():
    ds = Dataset.from_dict({"q": ["x"], "a": ["y"]})
    with pytest.raises(KeyError, match="column\\(s\\) \\['missing'\\]"):
        to_sharegpt(ds, merged_prompt="{q} {missing}", output_column_name="a")
    with pytest.raises(KeyError, match="output_column_name 'answer'"):
        to_sharegpt(ds, merged_prompt="{q}", output_column_name="answer")
    with pytest.raises(ValueError, match="conversation_extension must be an integer >= 1"):
        to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=0)


def test_standardize_sharegpt():
    ds = Dataset.from_dict({"conversations": [[{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                               {"from": "gpt", "value": "g"}]]})
    out = standardize_sharegpt(ds)
    assert out[0]["conversations"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "h"},
                                       {"role": "assistant", "content": "g"}]
    assert standardize_sharegpt(out)[0]["conversations"] == out[0]["conversations"]  # idempotent


def test_standardize_sharegpt_errors():
    bad_role = Dataset.from_dict({"conversations": [[{"from": "human", "value": "h"}], [{"from": "robot", "value": "x"}]]})
    with pytest.raises(ValueError, match="row 1, message 0: unknown role 'robot'"):
        standardize_sharegpt(bad_role)
    with pytest.raises(KeyError, match="no 'conversations' or 'messages' column"):
        standardize_sharegpt(Dataset.from_dict({"text": ["x"]}))


ALPACA_TEXT_TEMPLATE = """Below are some instructions that describe some tasks. Write responses that appropriately complete each request.

### Instruction:
{INPUT}

### Response:
{OUTPUT}"""

CHATML_TEXT_TEMPLATE = """<|im_start|>system
{SYSTEM}<|im_end|>
<|im_start|>user
{INPUT}<|im_end|>
<|im_start|>assistant
{OUTPUT}<|im_end|>"""

LLAMA3_TEXT_TEMPLATE = """<|begin_of_text|><|start_header_id|>system<|end_header_id|>

{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>

{INPUT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>

{OUTPUT}<|eot_id|>"""


def tutorial_dataset():
    """The tutorial's pipeline: to_sharegpt (2 turns) then standardize_sharegpt."""
    ds = Dataset.from_dict({"instruction": ["Add 1 and 2", "Name a colour"], "output": ["3", "Blue"]})
    return standardize_sharegpt(to_sharegpt(ds, merged_prompt="{instruction}", output_column_name="output",
                                            conversation_extension=2, random_state=0))


def test_apply_alpaca_text_template(tokenizer):
    ds = apply_chat_template(tutorial_dataset(), tokenizer=tokenizer, chat_template=ALPACA_TEXT_TEMPLATE)
    convo = ds[0]["conversations"]
    head = "Below are some instructions that describe some tasks. Write responses that appropriately complete each request.\n\n"
    turns = "".join(f"### Instruction:\n{u['content']}\n\n### Response:\n{a['content']}<|im_end|>\n\n"
                    for u, a in zip(convo[::2], convo[1::2]))
    assert ds[0]["text"] == head + turns
    # the tokenizer now prompts exactly like the training text
    prompt = tokenizer.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == head + f"### Instruction:\n{convo[0]['content']}\n\n### Response:\n"


def test_apply_chatml_text_template_with_system(tokenizer):
    ds = apply_chat_template(tutorial_dataset(), tokenizer=tokenizer, chat_template=CHATML_TEXT_TEMPLATE,
                             default_system_message="You are a helpful assistant")
    convo = ds[0]["conversations"]
    expected = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" + "".join(
        f"<|im_start|>user\n{u['content']}<|im_end|>\n<|im_start|>assistant\n{a['content']}<|im_end|>\n"
        for u, a in zip(convo[::2], convo[1::2]))
    assert ds[0]["text"] == expected


def test_apply_llama3_text_template(tokenizer):
    tokenizer.eos_token = "<|endoftext|>"
    ds = apply_chat_template(tutorial_dataset(), tokenizer=tokenizer, chat_template=LLAMA3_TEXT_TEMPLATE,
                             default_system_message="Be brief.")
    text = ds[0]["text"]
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\n")
    assert text.count("<|eot_id|><|endoftext|>") == 2  # each answer ends with the EOS


def test_apply_chat_template_errors(tokenizer):
    ds = tutorial_dataset()
    with pytest.raises(ValueError, match="must contain \\{OUTPUT\\} exactly once"):
        apply_chat_template(ds, tokenizer=tokenizer, chat_template="### Q: {INPUT}")
    with pytest.raises(ValueError, match="\\{OUTPUT\\} must come after \\{INPUT\\}"):
        apply_chat_template(ds, tokenizer=tokenizer, chat_template="{OUTPUT} then {INPUT}")
    with pytest.raises(ValueError, match="default_system_message was given but chat_template has no \\{SYSTEM\\}"):
        apply_chat_template(ds, tokenizer=tokenizer, chat_template=ALPACA_TEXT_TEMPLATE, default_system_message="x")
