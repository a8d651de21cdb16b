"""velotune's own generation engine: static KV cache, sampling, vLLM-shaped `fast_generate`.

Layering: above models/ and fast/ (it runs our decoder's layers and takes the fast path's
decisions), below lora/ and loading.py (which expose it as model methods)."""

from .adapters import LoRARequest, load_lora, save_lora
from .api import GenerationEngine, engine_of, fast_generate, generate_batch, hf_generate
from .cache import InferenceSettings
from .engine import release, resident_of
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams

__all__ = ["CompletionOutput", "GenerationEngine", "InferenceSettings", "engine_of", "LoRARequest", "RequestOutput", "SamplingParams", "fast_generate",
           "generate_batch", "hf_generate", "load_lora", "release", "resident_of", "save_lora"]
