"""Settings: defaults, `.env`, one-line errors, and `.env.example` listing every setting."""

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_readme(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.validation_alias), raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.ollama_base_url == "http://localhost:11434"
    assert settings.ollama_model == "tinyllama:1.1b-chat"
    assert settings.log_path == Path("logs/log.jsonl")


def test_env_file_and_environment_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "OLLAMA_MODEL=llama3:8b\nOLLAMA_BASE_URL=http://gpu-box:11434/\nMINIVAULT_MAX_PROMPT_CHARS=99\n"
    )
    monkeypatch.setenv("MINIVAULT_READ_TIMEOUT", "2.5")
    settings = Settings(_env_file=env_file)  # type: ignore[call-arg]

    assert settings.ollama_model == "llama3:8b"
    assert settings.ollama_base_url == "http://gpu-box:11434"
    assert settings.max_prompt_chars == 99
    assert settings.read_timeout == 2.5


@pytest.mark.parametrize(
    ("env", "value", "phrase"),
    [
        ("OLLAMA_BASE_URL", "localhost:11434", "must be an http:// or https:// URL"),
        ("OLLAMA_BASE_URL", "http://", "must be an http:// or https:// URL"),
        ("MINIVAULT_CONNECT_TIMEOUT", "-1", "greater than 0"),
        ("MINIVAULT_READ_TIMEOUT", "soon", "valid number"),
        ("MINIVAULT_MAX_PROMPT_CHARS", "0", "greater than 0"),
    ],
)
def test_bad_value_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, phrase: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(_env_file=None)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"invalid setting {env}={value!r}: ")
    assert phrase in message


def test_env_example_lists_every_setting_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]

    assert sorted(names) == sorted(str(field.validation_alias) for field in Settings.model_fields.values())
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[index - 1].startswith("#"), f"{line} has no comment above it"
    example = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if line and not line.startswith("#")}
    defaults = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    assert defaults.ollama_model == example["OLLAMA_MODEL"]
