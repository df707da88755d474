"""Configuration precedence: defaults < config file < environment < arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from unbroken.config import DEFAULT_DATABASE_URL, load_config
from unbroken.errors import ConfigurationError


def test_defaults(tmp_path: Path) -> None:
    config = load_config(cwd=tmp_path, environ={})
    assert config.database_url == DEFAULT_DATABASE_URL == "sqlite:///unbroken.db"
    assert config.journal_flush_interval_ms == 10
    assert config.journal_ack_timeout_ms == 5000
    assert config.max_payload_bytes == 1_048_576
    assert config.max_steps_per_execution == 10_000


def test_precedence_file_then_env_then_arguments(tmp_path: Path) -> None:
    (tmp_path / "unbroken.toml").write_text(
        'database_url = "sqlite:///file.db"\n'
        "journal_flush_interval_ms = 20\n"
        "max_payload_bytes = 7\n"
    )
    env = {"UNBROKEN_DATABASE_URL": "sqlite:///env.db", "UNBROKEN_MAX_PAYLOAD_BYTES": "9"}
    config = load_config(None, {"max_payload_bytes": 11}, cwd=tmp_path, environ=env)
    assert config.journal_flush_interval_ms == 20  # file
    assert config.database_url == "sqlite:///env.db"  # env over file
    assert config.max_payload_bytes == 11  # argument over env
    assert load_config("memory://", cwd=tmp_path, environ=env).database_url == "memory://"


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.unbroken]\nsqlite_synchronous = "FULL"\n')
    assert load_config(cwd=tmp_path, environ={}).sqlite_synchronous == "FULL"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"UNBROKEN_JOURNAL_ACK_TIMEOUT_MS": "soon"}, "must be a number"),
        ({"UNBROKEN_MAX_PAYLOAD_BYTES": "-1"}, "non-negative"),
        ({"UNBROKEN_SQLITE_SYNCHRONOUS": "OFF"}, "NORMAL or FULL"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_config(cwd=tmp_path, environ=env)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    (tmp_path / "unbroken.toml").write_text("flush_ms = 3\n")
    with pytest.raises(ConfigurationError, match="unknown setting 'flush_ms'"):
        load_config(cwd=tmp_path, environ={})
    with pytest.raises(ConfigurationError, match="unknown setting 'nope'"):
        load_config(None, {"nope": 1}, cwd=tmp_path / "missing", environ={})


def test_queue_concurrency_from_env_file_and_arguments(tmp_path: Path) -> None:
    env = {"UNBROKEN_QUEUE_CONCURRENCY": "default=8, emails=2"}
    assert load_config(cwd=tmp_path, environ=env).queue_concurrency == {"default": 8, "emails": 2}
    assert load_config(cwd=tmp_path, environ={}).queue_concurrency == {}
    (tmp_path / "unbroken.toml").write_text("[queue_concurrency]\nreports = 3\n")
    assert load_config(cwd=tmp_path, environ={}).queue_concurrency == {"reports": 3}
    config = load_config(None, {"queue_concurrency": {"a": 1}}, cwd=tmp_path, environ=env)
    assert config.queue_concurrency == {"a": 1}
    assert load_config(cwd=tmp_path, environ={}).worker_poll_interval_secs == 1.0


@pytest.mark.parametrize("raw", ["default", "default=0", "default=x", "=3", "a=-1"])
def test_bad_queue_concurrency_is_named(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigurationError, match="queue_concurrency"):
        load_config(cwd=tmp_path, environ={"UNBROKEN_QUEUE_CONCURRENCY": raw})
    with pytest.raises(ConfigurationError, match="queue_concurrency"):
        load_config(None, {"queue_concurrency": {"q": 0}}, cwd=tmp_path, environ={})
