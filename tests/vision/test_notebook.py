"""The docs' vision notebooks (Llama 3.2 Vision for radiography, Qwen2-VL for handwriting to LaTeX) step by
step with velotune on tiny models on the CPU: load, get_peft_model with the four switches, the collator,
SFTTrainer with the notebooks' settings, inference with a streamer, save_pretrained and
save_pretrained_merged. The cells are the notebooks' own; the substitutions are listed in NOTEBOOK_SUBS.
Then: a few steps lower the loss on coloured shapes, the merged folder loads in transformers with the
trained model's logits, the LoRA folder loads in PEFT with them too, and a GGUF llama.cpp could not run is refused by name."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from tiny import vision as tiny

# The notebook cells (unsloth's Llama 3.2 Vision / Qwen2-VL notebooks), `unsloth` written `velotune`.
NOTEBOOK = '''
from velotune import FastVisionModel # FastLanguageModel for LLMs
import torch

model, tokenizer = FastVisionModel.from_pretrained(
    MODEL_NAME,
    load_in_4bit = True, # Use 4bit to reduce memory use. False for 16bit LoRA.
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for long context
)

model = FastVisionModel.get_peft_model(
    model,
    finetune_vision_layers     = True, # False if not finetuning vision layers
    finetune_language_layers   = True, # False if not finetuning language layers
    finetune_attention_modules = True, # False if not finetuning attention layers
    finetune_mlp_modules       = True, # False if not finetuning MLP layers

    r = 16,           # The larger, the higher the accuracy, but might overfit
    lora_alpha = 16,  # Recommended alpha == r at least
    lora_dropout = 0,
    bias = "none",
    random_state = 3407,
    use_rslora = False,  # We support rank stabilized LoRA
    loftq_config = None, # And LoftQ
    # target_modules = "all-linear", # Optional now! Can specify a list if needed
)

instruction = "Write the LaTeX representation for this image."

def convert_to_conversation(sample):
    conversation = [
        { "role": "user",
          "content" : [
            {"type" : "text",  "text"  : instruction},
            {"type" : "image", "image" : sample["image"]} ]
        },
        { "role" : "assistant",
          "content" : [
            {"type" : "text",  "text"  : sample["text"]} ]
        },
    ]
    return { "messages" : conversation }

converted_dataset = [convert_to_conversation(sample) for sample in dataset]

FastVisionModel.for_inference(model) # Enable for inference!

image = dataset[2]["image"]
instruction = "Write the LaTeX representation for this image."

messages = [
    {"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": instruction}
    ]}
]
input_text = tokenizer.apply_chat_template(messages, add_generation_prompt = True)
inputs = tokenizer(
    image,
    input_text,
    add_special_tokens = False,
    return_tensors = "pt",
).to("cuda")

from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer, skip_prompt = True)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 128,
                   use_cache = True, temperature = 1.5, min_p = 0.1)

from velotune import is_bf16_supported
from velotune.trainer import UnslothVisionDataCollator
from trl import SFTTrainer, SFTConfig

FastVisionModel.for_training(model) # Enable for training!

trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    data_collator = UnslothVisionDataCollator(model, tokenizer), # Must use!
    train_dataset = converted_dataset,
    args = SFTConfig(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 4,
        warmup_steps = 5,
        max_steps = 30,
        # num_train_epochs = 1, # Set this instead of max_steps for full training runs
        learning_rate = 2e-4,
        fp16 = not is_bf16_supported(),
        bf16 = is_bf16_supported(),
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        report_to = "none",     # For Weights and Biases

        # You MUST put the below items for vision finetuning:
        remove_unused_columns = False,
        dataset_text_field = "",
        dataset_kwargs = {"skip_prepare_dataset": True},
        dataset_num_proc = 4,
        max_seq_length = 2048,
    ),
)

trainer_stats = trainer.train()

FastVisionModel.for_inference(model) # Enable for inference!
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 128,
                   use_cache = True, temperature = 1.5, min_p = 0.1)

model.save_pretrained("lora_model") # Local saving
tokenizer.save_pretrained("lora_model")

model.save_pretrained_merged("unsloth_finetune", tokenizer,)
'''
NOTEBOOK_SUBS = [
    ('.to("cuda")', '.to("cpu")', "no GPU in CI"),
    ("from velotune import is_bf16_supported", "from velotune import is_bfloat16_supported as is_bf16_supported",
     "velotune's name for it (DESIGN.md section 1)"),
    ("from velotune.trainer import UnslothVisionDataCollator", "from velotune import UnslothVisionDataCollator",
     "velotune exports the collator at the top level"),
    ("from trl import SFTTrainer, SFTConfig", "from velotune import SFTTrainer, SFTConfig",
     "TRL 1.x's SFTConfig has no max_seq_length; velotune's takes it"),
    ("max_steps = 30", "max_steps = 2", "two steps"),
    ("gradient_accumulation_steps = 4", "gradient_accumulation_steps = 1", "two steps of one batch"),
    ("max_new_tokens = 128", "max_new_tokens = 4", "a few tokens"),
]


def _shape(colour: str, shape: str, size=(48, 40)) -> Image.Image:
    rgb = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}[colour]
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (8, 6, size[0] - 8, size[1] - 6)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
    return image


SHAPES = [{"image": _shape(c, s), "text": f"a {c} {s}"} for c in ("red", "green", "blue") for s in ("circle", "square")]


def run_notebook(model_name: str, dataset, tmp_path, monkeypatch) -> dict:
    code = NOTEBOOK
    for old, new, _why in NOTEBOOK_SUBS:
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {"MODEL_NAME": model_name, "dataset": dataset}
    exec(compile(code, "vision_notebook", "exec"), scope)  # noqa: S102 - the notebook's cells, as written
    return scope


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_the_notebook_runs(family, vision_folder, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForImageTextToText

    scope = run_notebook(str(vision_folder(family)), SHAPES, tmp_path, monkeypatch)
    model, tokenizer = scope["model"], scope["tokenizer"]
    assert scope["trainer_stats"].global_step == 2
    assert capsys.readouterr().out.strip()  # the streamer printed the generated text
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()
    batch = scope["UnslothVisionDataCollator"](model, tokenizer)(scope["converted_dataset"][:2])
    batch.pop("labels")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "unsloth_finetune", dtype=torch.float32).eval()
    with torch.no_grad():
        trained = model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss_and_exports_equal_logits(vision_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from velotune import FastVisionModel, SFTConfig, SFTTrainer, UnslothVisionDataCollator

    model, processor = FastVisionModel.from_pretrained(str(vision_folder("gemma3")), load_in_4bit=False,
                                                       device_map="cpu")
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": "Name it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": s["text"]}]}]} for s in SHAPES]
    collate = UnslothVisionDataCollator(model, processor)
    batch = collate(rows)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collate, train_dataset=rows,
                         args=SFTConfig(per_device_train_batch_size=6, max_steps=4, learning_rate=2e-2,
                                        lr_scheduler_type="constant", logging_steps=1, report_to="none", seed=0,
                                        output_dir=str(tmp_path / "out"), remove_unused_columns=False,
                                        dataset_text_field="", dataset_kwargs={"skip_prepare_dataset": True}))
    trainer.train()
    after = loss()
    assert after < 0.8 * before, (before, after)

    del batch["labels"]
    with torch.no_grad():
        trained = model(**batch).logits  # (B, T, V)
    model.save_pretrained(tmp_path / "lora")
    model.save_pretrained_merged(tmp_path / "merged", processor)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(vision_folder("gemma3"), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapter(**batch).logits, trained, rtol=1e-5, atol=1e-5)

    # Gemma 3 GGUF is written (tests/vision/test_vision_gguf_gemma3.py), but this tiny model's attention scale
    # (query_pre_attn_scalar 256 over a head of 8) is one llama.cpp cannot run: refused before any file
    with pytest.raises(ValueError, match="query_pre_attn_scalar=256 .*scales attention by 8"):
        model.save_pretrained_gguf(tmp_path / "gguf", processor, quantization_method="q4_k_m")
    assert not any((tmp_path / "gguf").glob("*.gguf"))
    with pytest.raises(NotImplementedError, match="Ollama export of vision model type 'gemma3'"):
        model.save_pretrained_ollama(tmp_path / "ollama", processor)
    with pytest.raises(ValueError, match="vision models save as merged_16bit, lora"):
        model.save_pretrained_merged(tmp_path / "m4", processor, save_method="merged_4bit_forced")
