"""The server's own output (not the interaction log): text for people, or JSON lines for collectors.

With MINIVAULT_LOG_FORMAT=json every line MiniVault and uvicorn print is one JSON object with
`ts`, `level`, `logger`, `message`, and `request_id` when the line was printed while serving a
request (the request-id middleware puts it in a context variable).
"""

import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

request_id_var: ContextVar[str | None] = ContextVar("minivault_request_id", default=None)

_LOGGERS = ("app", "uvicorn", "uvicorn.error", "uvicorn.access")
_API_KEY_PARAM = re.compile(r"(api_key=)[^&\s\"']*")


class RedactApiKeys(logging.Filter):
    """uvicorn logs websocket paths with their query string, which may carry `?api_key=`: blank it out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _API_KEY_PARAM.sub(r"\1***", arg) if isinstance(arg, str) and "api_key=" in arg else arg
                for arg in record.args
            )
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
    if not any(getattr(h, "minivault", False) for h in app_logger.handlers):
        # uvicorn configures only its own loggers; without this, MiniVault's INFO lines would be lost.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [minivault] %(message)s"))
        handler.minivault = True  # type: ignore[attr-defined]
        app_logger.handlers = [h for h in app_logger.handlers if not isinstance(h.formatter, JsonFormatter)]
        app_logger.addHandler(handler)
