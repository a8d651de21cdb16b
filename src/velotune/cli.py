"""The `velotune` command line: every command is a plain function that is also a Python call.

    velotune train [CONFIG.yaml]          # no config: the embedded default (SmolLM2 + bundled data, CPU-sized)
    velotune train CONFIG.yaml --nproc 2  # DDP on two GPUs of this machine (torchrun underneath; launch.py)
    velotune export MODEL_DIR OUT_DIR --gguf q4_k_m q8_0 --merged merged_16bit --ollama
    velotune chat MODEL_DIR [--prompt TEXT]
    velotune quantize MODEL OUT_DIR --dynamic [--budget-gib X] [--calibration FILE]
    velotune consolidate CHECKPOINT OUT_DIR   # a sharded (fsdp) run's checkpoint -> an ordinary folder

A config's sections take the Python arguments' own names, so a notebook's call and a config say
the same thing: `model` -> `FastLanguageModel.from_pretrained`, `lora` ->
`FastLanguageModel.get_peft_model`, `training` -> `velotune.TrainingArguments`, `data` -> which
file (or bundled set) and chat template, `export` -> what to write after training.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import sys
from pathlib import Path

from .cli_checks import ConfigError  # raised by the checks and by this module; `velotune.cli.ConfigError`

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_CONFIG = {
    "model": {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_seq_length": 256, "load_in_4bit": False},
    "lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0, "bias": "none", "target_modules": ALL_LINEAR,
             "use_gradient_checkpointing": "unsloth", "random_state": 3407},
    "data": {"bundled": "instructions"},
    "training": {"output_dir": "outputs/velotune", "per_device_train_batch_size": 4, "max_steps": 10,
                 "learning_rate": 2e-4, "warmup_steps": 2, "logging_steps": 1, "report_to": "none",
                 "save_strategy": "no", "seed": 3407},
    "export": {},
}
DATA_KEYS = ("path", "bundled", "format", "chat_template", "text_field")
EXPORT_KEYS = ("merged", "gguf", "ollama")


def _allowed(section: str) -> set[str]:
    from . import FastLanguageModel, TrainingArguments

    if section == "model":
        return set(inspect.signature(FastLanguageModel.from_pretrained).parameters) - {"kwargs"}
    if section == "lora":
        return set(inspect.signature(FastLanguageModel.get_peft_model).parameters) - {"model", "kwargs"}
    if section == "training":
        return {f.name for f in dataclasses.fields(TrainingArguments)}
    return set(DATA_KEYS if section == "data" else EXPORT_KEYS)


def load_config(path: str | Path | None) -> dict:
    """The default config updated section by section with the YAML file's; unknown keys are errors."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    if path is None:
        return config
    import yaml  # transformers depends on PyYAML

    from .cli_checks import read_yaml

    given = read_yaml(path) or {}  # YAML 1.2 numbers (2e-4); syntax errors name line and column
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections {sorted(DEFAULT_CONFIG)}")
    for section, values in given.items():
        if section not in DEFAULT_CONFIG:
            raise ConfigError(f"{path}: unknown section {section!r}; sections are {sorted(DEFAULT_CONFIG)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys to values, got {values!r}")
        unknown = set(values or {}) - _allowed(section)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in section {section!r}; "
                              f"allowed: {sorted(_allowed(section))}")
        if section == "data" and values:
            config["data"] = {}  # a new data source replaces the bundled default instead of merging with it
        config[section].update(values or {})
    return config


def _messages_of(row: dict, fmt: str) -> list[dict]:
    if fmt == "alpaca":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return row["conversations" if fmt == "sharegpt" else "messages"]


def prepare_dataset(data: dict, tokenizer):
    """The configured data as a `text` column rendered with the chat template (raw text stays raw)."""
    from .chat_templates import get_chat_template, standardize_sharegpt
    from .data.bundled import load_bundled
    from .data.loading import load_local_dataset, validate_dataset

    if bool(data.get("path")) == bool(data.get("bundled")):
        raise ConfigError("data: give exactly one of 'path' (a local file) or 'bundled' (instructions | conversations)")
    if data.get("path"):
        dataset = load_local_dataset(data["path"], data.get("format"))
        fmt = validate_dataset(dataset, data.get("format"), source=data["path"])
    else:
        dataset = load_bundled(data["bundled"])
        fmt = validate_dataset(dataset, data.get("format"), source=f"bundled {data['bundled']}")
    field = data.get("text_field", "text")
    if fmt == "text":
        return dataset, field
    if fmt not in ("alpaca", "sharegpt", "openai"):
        raise ConfigError(f"data: {fmt} data is for preference or RL training, not `velotune train` (SFT)")
    if data.get("chat_template"):
        tokenizer = get_chat_template(tokenizer, data["chat_template"])
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data: the tokenizer has no chat template; set data.chat_template (e.g. chatml, llama-3)")
    if fmt == "sharegpt":
        dataset = standardize_sharegpt(dataset)
    render = lambda row: {field: tokenizer.apply_chat_template(_messages_of(row, fmt), tokenize=False)}  # noqa: E731
    return dataset.map(render, remove_columns=dataset.column_names), field


def train(config_path: str | None = None, nproc: int | None = None, nnodes: int = 1,
          rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> Path | None:
    """Load, attach LoRA, train with velotune's SFT trainer, save the adapter (and exports); returns
    the adapter folder. `nproc` (and, across machines, `nnodes`/`rdzv_endpoint`/`rdzv_id`): run the
    same command as that many data-parallel processes under torchrun (cli_launch.py); returns the
    adapter folder when they all succeed."""
    if nproc is not None:
        from .cli_launch import launch_training

        return launch_training(config_path, nproc, nnodes, rdzv_endpoint, rdzv_id)
    import torch

    from . import FastLanguageModel, SFTTrainer, TrainingArguments

    from .cli_checks import check_data, check_export, check_types
    from .launch import current
    from .training.run_lock import check_free

    launch = current()  # under torchrun: this rank's place (rank 0 writes the adapter and exports)

    config = load_config(config_path)
    # Every check that needs no model runs first: a config mistake costs a second, not a model load.
    where = config_path or "default config"
    check_types(config, where)
    training = dict(config["training"])
    training.setdefault("max_length", config["model"].get("max_seq_length"))
    if not torch.cuda.is_available() and "fp16" not in training and "bf16" not in training:
        # The default mixed precision is fp16 where bf16 is missing; on a CPU fp16 autocast ran 18x
        # slower than fp32 (SmolLM2 LoRA step, torch 2.13), so the command trains a CPU in fp32.
        training.update(fp16=False, bf16=False)
        if launch.distributed:
            training.setdefault("use_cpu", True)  # several CPU processes: the gloo backend
    args = TrainingArguments(dataset_text_field=config["data"].get("text_field", "text"), **training)
    check_export(config["export"], where)
    if training.get("fsdp") and any(config["export"].values()):
        raise ConfigError(f"{where}: training.fsdp with an export section: no GPU holds the whole sharded model "
                          "after training. Remove the export section and run `velotune export "
                          f"{Path(args.output_dir) / 'lora_model'} OUT_DIR ...` after the run")
    check_data(config["data"])
    if launch.main:
        check_free(args.output_dir)
    model, tokenizer = FastLanguageModel.from_pretrained(**config["model"])
    lora = dict(config["lora"], max_seq_length=config["model"].get("max_seq_length"))
    model = FastLanguageModel.get_peft_model(model, **lora)
    dataset, field = prepare_dataset(config["data"], tokenizer)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    trainer.train()
    adapter = Path(args.output_dir) / "lora_model"
    if getattr(trainer, "_sharding", None) is not None:
        trainer.save_model(str(adapter))  # FSDP2: every rank takes part in gathering the adapter; rank 0 writes it
    _leave_process_group(trainer)
    if not launch.main:
        return adapter  # rank 0 writes it
    if getattr(trainer, "_sharding", None) is None:
        model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    print(f"velotune: adapter saved to {adapter}")
    _export(model, tokenizer, Path(args.output_dir), **config["export"])
    return adapter


def _leave_process_group(trainer) -> None:
    """Under a launch, every rank leaves the process group together once training's last collective is done,
    before rank 0 writes the adapter and exports (which need no other rank, and may take longer than the group's
    timeout).

    Why this order: gloo's group joins its worker threads in its C++ destructor while the caller holds the GIL,
    and a worker releasing the last collective's tensors needs the GIL; when the DDP wrapper (whose Reducer holds
    the group) was freed with train()'s frame, rank 0 deadlocked there in about one run in three on the CPU
    (gdb: ~ProcessGroupGloo joining a thread in ~AsyncAllgatherWork). So: a barrier (its work holds no tensors)
    after the trainer's last gather, the wrapper freed while the group is still registered, then the group
    destroyed. Left to the interpreter's exit, the group's threads were torn down in no set order and a finished
    CPU rank aborted ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    trainer.accelerator.free_memory()  # drops accelerate's references to the DDP wrapper
    trainer.model_wrapped = trainer.model
    gc.collect()
    dist.destroy_process_group()


def _export(model, tokenizer, out: Path, merged: str | None = None, gguf=None, ollama: bool = False) -> None:
    from . import export

    if merged:
        export.save_pretrained_merged(model, out / merged, tokenizer, save_method=merged)
    if gguf:
        export.save_pretrained_gguf(model, out / "gguf", tokenizer, quantization_method=gguf)
    if ollama:
        export.save_pretrained_ollama(model, out / "ollama", tokenizer)


def export_model(model_dir: str, out_dir: str, merged: str | None = None, gguf: list[str] | None = None,
                 ollama: bool = False) -> Path:
    """Export a trained folder (adapter or full model) into out_dir's subfolders."""
    from . import FastLanguageModel

    if not (merged or gguf or ollama):
        raise ConfigError("export: ask for at least one of --merged METHOD, --gguf METHOD..., --ollama")
    from .cli_checks import check_export

    check_export({"gguf": gguf}, "velotune export")  # before the model loads
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)
    _export(model, tokenizer, Path(out_dir), merged=merged, gguf=gguf, ollama=ollama)
    return Path(out_dir)


def consolidate(checkpoint: str, out_dir: str) -> Path:
    """Write a sharded (FSDP2) run's distributed checkpoint as an ordinary folder (adapter or full model)
    that from_pretrained, `velotune export` and transformers load; one process, no GPU needed."""
    from .training.checkpoints_dcp import consolidate as write

    out = write(checkpoint, out_dir)
    print(f"velotune: consolidated {checkpoint} into {out}")
    return out


def quantize(model: str, out_dir: str, dynamic: bool = False, budget_gib: float | None = None,
             calibration: str | None = None, max_tokens: int = 4096, evaluate: bool = True,
             overwrite: bool = False) -> Path:
    """Write a bitsandbytes 4-bit (NF4) folder of a 16-bit model; `dynamic`: keep the layers that NF4
    hurts most in 16-bit within `budget_gib` (velotune.quantize, which logs the table and saves it)."""
    from . import FastLanguageModel
    from .export import save_pretrained_merged

    if not dynamic and (budget_gib is not None or calibration is not None):
        raise ConfigError("quantize: --budget-gib and --calibration choose 16-bit layers, which only --dynamic does")
    if budget_gib is not None and budget_gib <= 0:
        raise ConfigError(f"quantize: --budget-gib must be a positive size in GiB, got {budget_gib}")
    if calibration is not None and not Path(calibration).is_file():
        raise ConfigError(f"quantize: --calibration {calibration}: no such file (a .txt, .jsonl or .json file)")
    if dynamic:
        from .quantize import quantize_dynamic

        report = quantize_dynamic(model, out_dir, budget_gib=budget_gib, calibration=calibration,
                                  max_tokens=max_tokens, evaluate=evaluate, overwrite=overwrite)
        print(f"velotune: dynamic 4-bit folder written to {report.folder}: {report.summary()}")
        return Path(report.folder)
    loaded, tokenizer = FastLanguageModel.from_pretrained(model, load_in_4bit=False)
    folder = save_pretrained_merged(loaded, out_dir, tokenizer, save_method="merged_4bit_forced",
                                    overwrite=overwrite)
    print(f"velotune: 4-bit folder written to {folder}")
    return folder


def chat(model_dir: str, prompt: str | None = None, max_new_tokens: int = 256) -> str | None:
    """Talk to a model with its chat template: one answer with `prompt`; else a loop that reads
    questions from standard input until an empty line, end of input (Ctrl-D, or the end of a
    piped file) or Ctrl-C, all of which end the conversation normally."""
    from transformers import TextStreamer

    from . import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)
    FastLanguageModel.for_inference(model)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    while True:
        if prompt is not None:
            text = prompt
        else:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()  # leave the terminal on a fresh line
                return None
        if not text:
            return None
        history.append({"role": "user", "content": text})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        try:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C while answering ends the conversation, not with a traceback
            print()
            return None
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        if prompt is not None:
            return answer
        history.append({"role": "assistant", "content": answer})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every argument says what it does (`velotune COMMAND --help`)."""
    parser = argparse.ArgumentParser(prog="velotune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line (also accepted after COMMAND)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("train", help="train from a YAML config (none: the embedded default)",
                            description="Load a model, attach LoRA, train with velotune's SFT trainer, save the "
                                        "adapter to OUTPUT_DIR/lora_model and write the configured exports.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="YAML file with sections model / lora / data / training / export, whose keys are the Python "
                        "arguments' names; omitted: the embedded default (SmolLM2-135M-Instruct, bundled data, "
                        "10 CPU-sized steps)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel (DDP) in N processes on this machine, one per GPU, through torchrun; "
                        "per_device_train_batch_size is per process, so the global batch grows N times. The command "
                        "prints the torchrun line it runs")
    p.add_argument("--nnodes", type=int, default=1, metavar="M",
                   help="with --nproc, across M machines: run the same command on each, with the same "
                        "--rdzv-endpoint and --rdzv-id (default: 1, this machine only)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="with --nnodes > 1: the rendezvous address every machine reaches (one of the machines)")
    p.add_argument("--rdzv-id", metavar="ID", help="with --nnodes > 1: a job id shared by the machines of one run")
    p = commands.add_parser("export", help="write merged / GGUF / Ollama exports of a trained folder",
                            description="Export a trained folder (LoRA adapter or full model) into subfolders of "
                                        "OUT_DIR; each export is checked against the model in memory.")
    p.add_argument("model_dir", help="the trained folder: a saved LoRA adapter (e.g. outputs/velotune/lora_model) "
                                     "or a full model folder")
    p.add_argument("out_dir", help="folder that receives the exports (one subfolder per kind)")
    p.add_argument("--merged", choices=["merged_16bit", "merged_4bit_forced", "lora"],
                   help="write a Hugging Face folder: base and adapter merged in 16-bit, merged in NF4 4-bit, or "
                        "the adapter alone")
    p.add_argument("--gguf", nargs="+", metavar="METHOD",
                   help="write GGUF files for llama.cpp, one per quantization method (e.g. q4_k_m q8_0 f16)")
    p.add_argument("--ollama", action="store_true",
                   help="write a q4_k_m GGUF plus an Ollama Modelfile carrying the chat template")
    p = commands.add_parser("consolidate", help="turn a sharded (fsdp) run's checkpoint into an ordinary folder",
                            description="Read a checkpoint written by a run with fsdp=True (a torch distributed "
                                        "checkpoint, one shard per rank) and write its weights as an ordinary folder: "
                                        "the LoRA adapter, or the full model's config and safetensors, with the "
                                        "tokenizer. Runs in one process, without the base weights or a GPU.")
    p.add_argument("checkpoint", help="the checkpoint folder, e.g. outputs/run/checkpoint-500")
    p.add_argument("out_dir", help="folder that receives the consolidated model")
    p = commands.add_parser("chat", help="chat with a model folder",
                            description="Chat with a model using its chat template. Without --prompt it reads "
                                        "questions from standard input until an empty line, end of input (Ctrl-D) "
                                        "or Ctrl-C.")
    p.add_argument("model_dir", help="a trained folder (LoRA adapter or full model) or a model name")
    p.add_argument("--prompt", help="ask this one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default: 256)")
    p = commands.add_parser("quantize", help="write a bitsandbytes 4-bit folder (--dynamic: error-chosen 16-bit layers)",
                            description="Quantize a 16-bit model to NF4 in bitsandbytes' format (velotune, transformers "
                                        "and Unsloth load it). With --dynamic, calibration text measures each layer's "
                                        "NF4 output error and the worst layers stay in 16-bit within a memory budget; "
                                        "the table of errors and the chosen layers are printed and saved in OUT_DIR.")
    p.add_argument("model", help="the 16-bit model: a folder or a model name")
    p.add_argument("out_dir", help="folder that receives the 4-bit checkpoint")
    p.add_argument("--dynamic", action="store_true",
                   help="keep the layers with the largest measured NF4 error in 16-bit (dynamic 4-bit)")
    p.add_argument("--budget-gib", type=float, metavar="X",
                   help="with --dynamic: the folder's largest size in GiB (default: 10%% above all-4-bit; a size below "
                        "all-4-bit is an error that names the minimum)")
    p.add_argument("--calibration", metavar="FILE",
                   help="with --dynamic: calibration text, .txt or .jsonl/.json rows with a 'text' field (default: "
                        "velotune's bundled instruction text)")
    p.add_argument("--max-tokens", type=int, default=4096, help="with --dynamic: calibration tokens (default: 4096)")
    p.add_argument("--no-eval", action="store_true",
                   help="with --dynamic: skip the held-out perplexity of 16-bit / NF4 / dynamic (saves a second copy "
                        "of the layers in memory)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder velotune did not create")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        if args.command == "train":
            if args.nproc is None and (args.nnodes != 1 or args.rdzv_endpoint or args.rdzv_id):
                raise ValueError("--nnodes, --rdzv-endpoint and --rdzv-id go with --nproc N (processes per machine)")
            if train(args.config, args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id) is None:
                return 1  # a launched rank failed; torchrun printed which and why
        elif args.command == "consolidate":
            consolidate(args.checkpoint, args.out_dir)
        elif args.command == "export":
            export_model(args.model_dir, args.out_dir, args.merged, args.gguf, args.ollama)
        elif args.command == "quantize":
            quantize(args.model, args.out_dir, args.dynamic, args.budget_gib, args.calibration, args.max_tokens,
                     not args.no_eval, args.overwrite)
        else:
            chat(args.model_dir, args.prompt, args.max_new_tokens)
    except (ValueError, OSError) as exc:  # a user's mistake (config, data, folders): one line, exit code 2
        if debug:
            raise
        from .cli_checks import one_line

        print(f"velotune: error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train has saved a resumable checkpoint by then (training/checkpoints.py)
        print("velotune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
