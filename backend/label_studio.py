"""Reads from Label Studio that the serving side needs (the SDK, never hand-built REST calls)."""
from __future__ import annotations

import logging

from .images import LabelStudioAccess

log = logging.getLogger(__name__)


class LabelStudioNotConfigured(RuntimeError):
    """LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is empty where a job needs to read or write Label Studio."""


def credentials(settings, purpose: str) -> tuple[str, str]:
    """(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY): the one check that both are set, for whatever needs the SDK with
    the operator's token; raises LabelStudioNotConfigured naming `purpose` ("to pre-label a project")."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        raise LabelStudioNotConfigured(f"LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set {purpose}")
    return settings.label_studio_url, settings.label_studio_api_key


def access_for(settings, hostname: str, token: str) -> LabelStudioAccess:
    """Where to read Label Studio, with which token. A configured LABEL_STUDIO_URL wins over the /setup
    `hostname` (often localhost as seen from Label Studio's own container) and is the only host trusted by the
    SSRF guard; LABEL_STUDIO_API_KEY goes to that URL only, never to a host a /setup body named."""
    if settings.label_studio_url:
        return LabelStudioAccess(url=settings.label_studio_url, token=settings.label_studio_api_key or token, trusted=True)
    return LabelStudioAccess(url=hostname, token=token, trusted=False)


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
