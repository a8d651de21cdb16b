"""Where each Python block of the docs is tested, or why it is not.

`test_coverage.py` checks that every Python block of the seed matches exactly one entry here, that
every entry still matches a block, and that each named test exists and reads its block by the same
marker. A new doc snippet therefore fails CI until someone decides where it belongs.

SNIPPETS: marker (a substring unique to one block) -> "module::test".
FRAGMENTS: the whole text of one-line parameter blocks (matched exactly: their text also occurs inside
    bigger snippets) -> "module::test".
NOT_VELOTUNE: marker -> why the block is not a velotune snippet (installation, another tool, network
    services, a model's sample output). Snippets of velotune features that belong to an open issue are
    NOT listed here: they have a test marked `skip(reason="issue N: ...")` in SNIPPETS.
"""

SNIPPETS = {
    # open issues: tests exist and are skipped until the feature lands
    'model.fast_generate(["Hello!"])': "test_open_issues::test_fast_inference_vllm",
    "PatchDPOTrainer()": "test_open_issues::test_dpo",
    # saving and exporting
    'model.save_pretrained_gguf("dir", tokenizer, quantization_method = "q4_k_m")': "test_saving::test_save_gguf",
    'model.push_to_hub_gguf("hf_username/dir"': "test_saving::test_push_to_hub_gguf_offline",
    "ALLOWED_QUANTS = \\": "test_saving::test_allowed_quants",
    'model.save_pretrained_merged("merged_model"': "test_saving::test_save_merged_for_llama_cpp",
    'save_method = "merged_16bit", token = "")': "test_saving::test_save_merged_16bit",
    'save_method = "merged_4bit", token = "")': "test_saving::test_save_merged_4bit",
    'save_method = "lora", token = "")': "test_saving::test_save_lora",
    "model.save_pretrained(...) AND tokenizer.save_pretrained(...)": "test_saving::test_save_adapter_and_tokenizer",
    # training
    'save_strategy = "steps",': "test_training::test_checkpoints_and_resume",
    "dataset_num_proc=1,": "test_training::test_windows_dataset_num_proc",
    "fp16_full_eval = True,": "test_training::test_evaluation_loop",
    '"lm_head", "embed_tokens",],': "test_training::test_continued_pretraining",
    "embedding_learning_rate = 5e-6,": "test_training::test_continued_pretraining",
    'model_name = "LORA_MODEL_NAME",': "test_training::test_continue_from_lora_adapter",
    'report_to = "wandb",': "test_training::test_wandb_arguments",
    # chat templates and data
    'chat_template = "chatml",': "test_chat_templates::test_get_chat_template_sharegpt",
    "unsloth_template = \\": "test_chat_templates::test_custom_chat_template",
    '"conversations": [\\': "test_chat_templates::test_sharegpt_conversation_format",
    # inference and troubleshooting
    'model_name = "lora_model",': "test_inference::test_inference_after_training",
    'locale.getpreferredencoding = lambda: "UTF-8"': "test_inference::test_utf8_locale_workaround",
}

FRAGMENTS = {
    # "Tutorial: How to Finetune Llama-3 and Use In Ollama", settings and parameters, one block each
    "max_seq_length = 2048": "test_training::test_tutorial_settings_and_parameters",
    "dtype = None": "test_training::test_tutorial_settings_and_parameters",
    "load_in_4bit = True": "test_training::test_tutorial_settings_and_parameters",
    "r = 16, # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128":
        "test_training::test_tutorial_settings_and_parameters",
    'target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",\\\n                     "gate_proj", "up_proj", '
    '"down_proj",],': "test_training::test_tutorial_settings_and_parameters",
    "lora_alpha = 16,": "test_training::test_tutorial_settings_and_parameters",
    "lora_dropout = 0, # Supports any, but = 0 is optimized": "test_training::test_tutorial_settings_and_parameters",
    'bias = "none",    # Supports any, but = "none" is optimized':
        "test_training::test_tutorial_settings_and_parameters",
    'use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context':
        "test_training::test_tutorial_settings_and_parameters",
    "random_state = 3407,": "test_training::test_tutorial_settings_and_parameters",
    "use_rslora = False,  # We support rank stabilized LoRA": "test_training::test_tutorial_settings_and_parameters",
    "loftq_config = None, # And LoftQ": "test_training::test_tutorial_settings_and_parameters",
    "per_device_train_batch_size = 2,": "test_training::test_tutorial_settings_and_parameters",
    "gradient_accumulation_steps = 4,": "test_training::test_tutorial_settings_and_parameters",
    "max_steps = 60, # num_train_epochs = 1,": "test_training::test_tutorial_settings_and_parameters",
    "learning_rate = 2e-4,": "test_training::test_tutorial_settings_and_parameters",
    "trainer_stats = trainer.train(resume_from_checkpoint = True)": "test_training::test_checkpoints_and_resume",
}

NOT_VELOTUNE = {
    "from packaging.version import Version as V": "installation: prints the pip command for this torch/CUDA",
    'os.environ["WANDB_PROJECT"]': "Weights & Biases set-up: installs wandb and logs in (shell lines, an account)",
    "run.use_artifact(": "Weights & Biases: downloads a run's artifact from wandb.ai (an account and network)",
    'repo_id = "unsloth/DeepSeek-R1-GGUF",': "downloads DeepSeek-R1 GGUF files from the hub for llama.cpp",
    'repo_id = "unsloth/QwQ-32B-GGUF",': "downloads QwQ-32B GGUF files from the hub for llama.cpp",
    "dry\ntyp_p\nxtc": "llama.cpp's sampler order (command-line values), not Python",
    "import pygame": "a model's sample answer in the QwQ tutorial (a Flappy Bird game in pygame)",
}
