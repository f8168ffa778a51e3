"""What this host runs natively, for the defaults that depend on it (the engine's dtype, the trainers' bf16)."""
from __future__ import annotations

from functools import lru_cache

ENGINE_DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")  # what vLLM's --dtype takes


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """bf16 matrix multiplies run natively here: a CUDA GPU that has them, or a CPU with AVX512-BF16 or AMX tiles.
    Elsewhere bf16 is emulated and slower than fp32: on an AVX2-only CPU the engine scored closed-set tasks 5x
    slower in bf16 than in fp32, and on an AVX512-BF16 CPU the policy's SFT step took about half the time of fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks (private, hence getattr)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def engine_dtype(setting: str) -> str:
    """The --dtype of an engine `dataengine serve` starts on this host: `auto` is bfloat16 where it runs natively,
    float32 elsewhere (vLLM's own `auto` keeps the checkpoint's bfloat16 on any CPU); anything else as set."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bf16() else "float32"
