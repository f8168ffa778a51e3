"""Run a real Label Studio server for end-to-end tests.

Label Studio lives in its own virtualenv because its dependency pins clash with ours.

    with LabelStudioServer() as ls:
        httpx.get(f"{ls.url}/api/projects", headers=ls.headers)

Manual use: ``python -m tests.e2e.label_studio_harness start`` prints ``URL TOKEN``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = Path(
    os.environ.get("DATAENGINE_LS_VENV", REPO_ROOT / ".venv-labelstudio")
)

# Fallback for a data dir whose organization was created without LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN.
_ENABLE_LEGACY_TOKENS = (
    "from organizations.models import Organization\n"
    "for org in Organization.objects.all():\n"
    "    org.jwt.legacy_api_tokens_enabled = True\n"
    "    org.jwt.save()\n"
)


def ensure_label_studio_venv(venv_dir: Path = DEFAULT_VENV) -> Path:
    """Create `venv_dir` with Label Studio installed (once) and return its python."""
    venv_dir = Path(venv_dir)
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / f".label-studio-{LABEL_STUDIO_VERSION}.installed"
    if stamp.exists() and python.exists():
        return python
    if not python.exists():
        base = shutil.which("python3.11") or sys.executable
        subprocess.run([base, "-m", "venv", str(venv_dir)], check=True)
    package = f"label-studio=={LABEL_STUDIO_VERSION}"
    subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
    stamp.write_text(LABEL_STUDIO_VERSION + "\n")
    return python


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


class LabelStudioServer:
    """A Label Studio process on 127.0.0.1 with a fresh sqlite database and a known API token."""

    host = "127.0.0.1"

    def __init__(
        self,
        venv_dir: Path = DEFAULT_VENV,
        port: int | None = None,
        data_dir: Path | None = None,
        username: str = "admin@example.com",
        password: str = "dataengine-e2e",
        token: str = "dataengine-e2e-token-0123456789abcdef",
        startup_timeout: float = 240.0,
    ) -> None:
        self.venv_dir = Path(venv_dir)
        self.port = port or free_port(self.host)
        self.username, self.password, self.token = username, password, token
        self.startup_timeout = startup_timeout
        self._root = Path(tempfile.mkdtemp(prefix="label-studio-e2e-"))
        self._owns_data = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else self._root / "data"
        self.log_path = self._root / "label-studio.log"
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An httpx client for this server's REST API, authenticated with the legacy token.

        The default timeout is above Label Studio's own 100 s limit for an ML backend's /predict, since
        actions such as "retrieve predictions" wait for the backend synchronously.
        """
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.log_path} (tail) ---\n{tail(self.log_path, lines)}"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LABEL_STUDIO_", "PYTHON", "VIRTUAL_ENV"))
        }
        env.update(
            PATH=f"{self.venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            DJANGO_DB="sqlite",
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # new orgs accept `Token <token>`
            LABEL_STUDIO_HOST=self.url,  # the `hostname` Label Studio sends to ML backends
            ML_BLOCK_LOCAL_IP="false",  # allow an ML backend on loopback
            # Label Studio gives an ML backend 3 s for /setup and 1 s for /health when it connects; on a 2-core
            # host busy with training those time out and the connection is refused. Real deployments raise them too.
            ML_TIMEOUT_SETUP="30",
            ML_TIMEOUT_HEALTH="10",
            SSRF_PROTECTION_ENABLED="false",
            LATEST_VERSION_CHECK="false",  # else it asks PyPI for its version on import
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
        )
        return env

    def start(self) -> LabelStudioServer:
        """Launch Label Studio and wait until it serves the API with our token."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> LabelStudioServer:
        """Start the process without waiting (it boots in about 30 s): `url` and `token` are already
        valid, so other services can be configured meanwhile. Follow with `wait_ready()`."""
        ensure_label_studio_venv(self.venv_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        cmd = [
            str(self.venv_dir / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--internal-host",
            self.host,
            "--port",
            str(self.port),
        ]
        self._proc = subprocess.Popen(
            cmd,
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self) -> LabelStudioServer:
        """Wait for /health, then make sure the legacy token is accepted; stops the server on failure."""
        if self._proc is None:
            raise RuntimeError("wait_ready() before launch()")
        try:
            self._wait_healthy()
            self._ensure_token()
        except BaseException:
            self.stop()
            raise
        return self

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"Label Studio at {self.url}: {why}\n{self.log_tail()}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._fail(
                    f"exited with code {self._proc.returncode} during start-up"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise self._fail(f"not healthy after {self.startup_timeout:.0f} s")

    def _token_works(self) -> bool:
        r = httpx.get(f"{self.url}/api/projects", headers=self.headers, timeout=30)
        return r.status_code == 200

    def _ensure_token(self) -> None:
        if self._token_works():
            return
        self.manage("shell", "-c", _ENABLE_LEGACY_TOKENS)
        if not self._token_works():
            raise self._fail("GET /api/projects with `Token <token>` is not 200")

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        """Run Label Studio's `manage.py` against this server's database."""
        python = self.venv_dir / "bin" / "python"
        manage_py = next(
            self.venv_dir.glob("lib/python*/site-packages/label_studio/manage.py")
        )
        return subprocess.run(
            [str(python), str(manage_py), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            except ProcessLookupError:
                pass
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._owns_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["start"]:
        print("usage: python -m tests.e2e.label_studio_harness start", file=sys.stderr)
        return 2
    # Unwind the `with` on Ctrl-C/SIGTERM (also when launched with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LabelStudioServer() as ls:
        print(ls.url, ls.token, flush=True)
        print(f"log: {ls.log_path}", file=sys.stderr, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
