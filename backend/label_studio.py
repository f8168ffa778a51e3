"""Reads from Label Studio that the serving side needs (the SDK, never hand-built REST calls)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def client(url: str, api_key: str, timeout: float = 10.0, guarded: bool = False):
    """The SDK client; thread-safe (prelabel shares it between its reader and writer threads). `guarded`: the
    URL came from a caller, not the operator: the SSRF guard checks (and pins) the host, no redirects."""
    import httpx
    from label_studio_sdk import LabelStudio

    from .ssrf import GuardedTransport
    from .thread_transport import PerThreadTransport

    transport = GuardedTransport(PerThreadTransport()) if guarded else PerThreadTransport()
    http = httpx.Client(timeout=timeout, follow_redirects=not guarded, transport=transport)
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout, httpx_client=http)


def fetch_instructions(url: str, api_key: str, project: str, guarded: bool, timeout: float = 3.0) -> str | None:
    """The project's labeling instructions (`expert_instruction`), or None when Label Studio can't be read.

    Best effort: /setup must answer even when Label Studio is slow, the token lacks access, or the SSRF guard
    refuses a `hostname` that /setup sent.
    """
    if not (url and api_key and project.isdigit()):
        return None
    try:
        project_obj = client(url, api_key, timeout, guarded=guarded).projects.get(id=int(project))
    except Exception as exc:  # network, auth and API errors all mean "keep what we had"
        log.warning("could not read instructions of project %s from %s: %s", project, url, exc)
        return None
    return getattr(project_obj, "expert_instruction", None) or ""
