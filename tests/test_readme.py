"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_examples() -> None:
    assert len(python_blocks()) >= 2


def test_fastapi_lifespan_example_serves_a_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    block = next(b for b in python_blocks() if "lifespan" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), scope)
    with TestClient(scope["app"]) as client:
        for turn in range(3):
            r = client.post(
                "/workflow", json={"messages": [f"turn {turn}"]}, headers={"X-Thread-ID": "user-1"}
            )
            assert r.status_code == 200, r.text
        assert r.json()["messages"][-1] == "reply to turn 2"
    assert (tmp_path / "checkpoints.db").exists()


def test_delete_checkpoints_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    block = next(b for b in python_blocks() if "delete_checkpoints" in b)
    monkeypatch.setenv("TZ", os.environ.get("TZ", "UTC"))
    exec(compile(block, "README.md", "exec"), {})
