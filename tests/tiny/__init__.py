"""The test suite's one tiny-model factory (issue 15): every tiny model a test builds comes from here.

- `families`: random configs of every family we implement (hidden 64, vocab 128) exercising each
  architecture knob, and their transformers references (`make_config`, `make_hf`, `randomize_`).
- `export_shapes`: the same families shaped for export (rows multiples of 256 so the k-quants
  apply) with real BPE / SentencePiece-style tokenizers (`CONFIGS`, `model`, `tokenizer`).
- `folders`: a tiny random Llama saved the way checkpoints are, with a real character tokenizer
  (`write_tiny_llama`, `tiny_folder`), and velotune's LoRA model loaded from it (`tiny_lora`).
- `sharded`: any transformers model saved as several safetensors shards whose boundaries cut through
  decoder layers, with the index (`write_sharded`; the streaming-load tests).
- `vision`: tiny vision-language models of the five vision families with character tokenizers, each
  family's chat template and small image processors (tests/vision, bench/bench_vision.py).
- `lora`: our model of any family with LoRA on every projection (`lora_model`), a padded batch and
  `loss_and_grads`, for fast-vs-plain comparisons.

The folder fixture most suites share is `tiny_llama_dir` in tests/conftest.py.
"""
