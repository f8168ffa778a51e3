"""What the benchmarks share: the engine they measure, and review texts to send it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from backend.engine_process import EngineProcess
from backend.settings import Settings
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SENTIMENT_LABELS = ("Positive", "Negative")  # the review data is binary
SENTIMENT_CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
    + "".join(f'<Choice value="{label}"/>' for label in SENTIMENT_LABELS)
    + "</Choices></View>"
)


@dataclass
class BenchEngine:
    url: str
    model: str | None  # the model directory it serves; None: an engine already running, given without --model
    process: EngineProcess | None = None  # None: an engine already running (not ours to stop)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_engine(workdir: Path, *, engine_url: str | None = None, model: str | None = None, model_name: str = "tiny") -> BenchEngine:
    """The engine already running at `engine_url` (serving `model` as `model_name`), else the vLLM engine
    started here on `model`, by default a tiny random model built in `workdir`. `stop()` when done."""
    if engine_url:
        return BenchEngine(engine_url, model)
    from training.tiny_model import build_tiny_model

    model = model or str(build_tiny_model(Path(workdir) / "tiny"))
    process = EngineProcess(Settings(model=model, served_model_name=model_name, engine_port=free_port(),
                                     engine_max_model_len=4096, model_dir=Path(workdir) / "engine"))
    return BenchEngine(process.start(), model, process)


def resolve_model(model: str | None, model_name: str | None, workdir: Path) -> tuple[str, str]:
    """(model directory, served name): the embedded SmolLM2-135M-Instruct by default (prepared once from its
    PyPI wheel), `tiny` for a tiny random model built in `workdir`, else the directory given."""
    if model == "tiny":
        from training.tiny_model import build_tiny_model

        return str(build_tiny_model(Path(workdir) / "tiny")), model_name or "tiny"
    if model is None:
        from training.embedded_model import materialize

        model = str(materialize(Settings().embedded_model_dir))
    return model, model_name or Path(model).name


def sample_texts(count: int) -> list[str]:
    """`count` review sentences from ../shared/data/sentiment (repeated as needed), else the sample tasks'."""
    shared = REPO.parent / "shared" / "data" / "sentiment"
    lines: list[str] = []
    for path in sorted(shared.glob("*_labelled.txt")) if shared.exists() else []:
        lines += [line.rsplit("\t", 1)[0].strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        lines = [task["data"]["text"] for task in json.loads((REPO / "label_config/sentiment.tasks.json").read_text())]
    return [lines[i % len(lines)] for i in range(count)]
