"""The server's own output (not the interaction log): text for people, or JSON lines for collectors.

With MINIVAULT_LOG_FORMAT=json every line MiniVault and uvicorn print is one JSON object with
`ts`, `level`, `logger`, `message`, and `request_id` when the line was printed while serving a
request (the request-id middleware puts it in a context variable).
"""

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

import orjson

request_id_var: ContextVar[str | None] = ContextVar("minivault_request_id", default=None)

_LOGGERS = ("app", "uvicorn", "uvicorn.error", "uvicorn.access")


class RedactApiKeys(logging.Filter):
    """uvicorn logs paths with their query string, which may carry `?api_key=` (however the name is
    percent-encoded): the value is replaced by `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(_redact(arg) if isinstance(arg, str) and "?" in arg else arg for arg in record.args)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def _redact(target: str) -> str:
    path, _, query = target.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(name == "api_key" for name, _ in pairs):
        return target
    masked = [(name, "***" if name == "api_key" else value) for name, value in pairs]
    return f"{path}?{urlencode(masked, safe='*')}"


def configure_server_log(log_format: str) -> None:
    """Send MiniVault's loggers (and uvicorn's, in JSON mode) to stderr in the chosen format."""
    app_logger = logging.getLogger("app")
    app_logger.setLevel(logging.INFO)
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeys) for f in logger.filters):
            logger.addFilter(RedactApiKeys())
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = [handler]
            # uvicorn's own loggers do not propagate; ours must not print twice through the root.
            logger.propagate = False
        return
    app_logger.propagate = True
    if not any(getattr(h, "minivault", False) for h in app_logger.handlers):
        # uvicorn configures only its own loggers; without this, MiniVault's INFO lines would be lost.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [minivault] %(message)s"))
        handler.minivault = True  # type: ignore[attr-defined]
        app_logger.handlers = [h for h in app_logger.handlers if not isinstance(h.formatter, JsonFormatter)]
        app_logger.addHandler(handler)
