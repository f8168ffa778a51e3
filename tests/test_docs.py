"""The README documents every setting, and its two commands are the ones CI and the Makefile use."""
from __future__ import annotations

from backend.settings import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def env_names(name: str, field) -> list[str]:
    alias = field.validation_alias
    if alias is None:
        return [f"DATAENGINE_{name.upper()}"]
    choices = getattr(alias, "choices", None)
    return [str(c) for c in choices] if choices else [str(alias)]


def test_every_setting_is_documented():
    documented = {name: env_names(name, field) for name, field in Settings.model_fields.items()}
    missing = [names[0] for names in documented.values() if not any(n in README for n in names)]
    assert not missing, f"document these in README's Configuration table: {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README and "make run" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
