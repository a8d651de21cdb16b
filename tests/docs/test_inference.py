"""The docs' inference page: load the saved LoRA model, `for_inference`, stream a generation; and
the UTF-8 locale workaround of the troubleshooting pages."""

from __future__ import annotations

import locale

from transformers import TextStreamer

from velotune import FastLanguageModel

from .snippets import SMOLLM2, VELOTUNE, Sub, find_block, run_snippet


def test_inference_after_training(capsys):
    block = find_block('model_name = "lora_model",')
    # The notebook's earlier cells: a LoRA model on SmolLM2 saved as "lora_model", the settings and the
    # prompt. load_in_4bit = False: on the CPU every 4-bit weight is dequantized for each new token
    # (2.6 s a token here); test_training's tutorial test loads and trains SmolLM2 in 4 bits.
    base, tokenizer = FastLanguageModel.from_pretrained(SMOLLM2, max_seq_length=64, load_in_4bit=False,
                                                        device_map="cpu")
    FastLanguageModel.get_peft_model(base, r=16, lora_alpha=16, random_state=3407).save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    scope = {"max_seq_length": 64, "dtype": None, "load_in_4bit": False, "TextStreamer": TextStreamer,
             "inputs": inputs}
    run_snippet(block, [*VELOTUNE, Sub("max_new_tokens = 64", "max_new_tokens = 12", "a few tokens on the CPU")],
                scope)
    model = scope["model"]
    assert not model.training and model.peft_config["default"].r == 16
    assert "Paris" in capsys.readouterr().out  # the streamer printed the answer


def test_utf8_locale_workaround():
    block = find_block('locale.getpreferredencoding = lambda: "UTF-8"')
    saved = locale.getpreferredencoding
    try:
        run_snippet(block)
        assert locale.getpreferredencoding() == "UTF-8"
        from velotune.chat_templates import get_chat_template  # the library still imports and works after it

        assert callable(get_chat_template)
    finally:
        locale.getpreferredencoding = saved
