"""The pages a browser opens: the playground at `/`, and Swagger UI and ReDoc served from local files.

Nothing here loads from the internet: the machine running MiniVault may be offline. The docs'
JavaScript and CSS come from the `fastapi-offline` package, which ships Swagger UI's and ReDoc's
release files, rather than from copies kept by hand.
"""

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
# What a browser needs before it can send a key: the page, the docs and the schema they read.
OPEN_PATHS = frozenset({"/", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs-assets/")
# ReDoc's menu footer shows Redocly's logo from their CDN, whatever the options say; this serves it from here.
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"

router = APIRouter(include_in_schema=False)


# The page keeps the API key in local storage: no other site may frame it (clickjacking), run script in
# it, or have a response sniffed into a script. Each policy allows only what that page loads from here.
def _page_csp(script: str = "'self'", style: str = "'self'", extra: str = "") -> str:
    """A page's Content-Security-Policy: everything from here only, with `script` and `style` sources and `extra`."""
    return (
        f"default-src 'none'; script-src {script}; style-src {style}; {extra}connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


_PAGE_CSP = _page_csp()
_ASSET_CSP = "default-src 'none'; frame-ancestors 'none'"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def security_headers(csp: str) -> dict[str, str]:
    """The headers every page and file a browser loads from MiniVault carries."""
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",  # frame-ancestors, for browsers older than CSP 2
        "Referrer-Policy": "no-referrer",
    }


def _script_hashes(html: str) -> str:
    """CSP sources allowing exactly the inline scripts of `html`."""
    blocks = _INLINE_SCRIPT.findall(html)
    digests = (base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks)
    return " ".join(f"'sha256-{digest}'" for digest in digests)


_PAGE_SECURITY = security_headers(_PAGE_CSP)
PAGE_HEADERS = {**_PAGE_SECURITY, "Cache-Control": "no-cache"}


@router.api_route("/", methods=["GET", "HEAD"])
async def playground() -> FileResponse:
    """The chat page (app/static/index.html)."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@cache
def _swagger_page() -> tuple[bytes, dict[str, str]]:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="MiniVault - Swagger UI",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon.png",
        # The validator badge would ask validator.swagger.io about the schema.
        swagger_ui_parameters={"validatorUrl": None},
    )
    body = bytes(page.body)  # an HTMLResponse of a str: its body is bytes
    # Swagger UI's start-up script is inline: its hash, not 'unsafe-inline', lets it (and only it) run.
    return body, security_headers(_page_csp(script=f"'self' {_script_hashes(body.decode())}"))


@cache
def _redoc_page() -> tuple[bytes, dict[str, str]]:
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="MiniVault - ReDoc",
        redoc_js_url="/docs-assets/redoc.standalone.js",
        redoc_favicon_url="/docs-assets/favicon.png",
        with_google_fonts=False,
    )
    # ReDoc writes its styles into <style> elements as it renders (styled-components), and runs its search
    # index in a worker made from a blob: URL.
    csp = _page_csp(style="'self' 'unsafe-inline'", extra="worker-src blob:; font-src 'self' data:; ")
    return bytes(page.body), security_headers(csp)


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui() -> HTMLResponse:
    body, headers = _swagger_page()
    return HTMLResponse(body, headers=headers)


@router.api_route("/redoc", methods=["GET", "HEAD"])
async def redoc() -> HTMLResponse:
    body, headers = _redoc_page()
    return HTMLResponse(body, headers=headers)


@cache
def _redoc_script() -> bytes:
    return (DOCS_ASSETS_DIR / "redoc.standalone.js").read_bytes().replace(_REDOC_LOGO, b"/docs-assets/favicon.png")


@router.get("/docs-assets/redoc.standalone.js")
def redoc_js() -> Response:
    """fastapi-offline's ReDoc bundle, its one internet address (the Redocly logo) pointed at a local image."""
    return Response(_redoc_script(), media_type="text/javascript; charset=utf-8", headers=_ASSET_HEADERS)


_ASSET_HEADERS = security_headers(_ASSET_CSP)


class _WithHeaders:
    """Adds `headers` to every response of a mounted app (StaticFiles has no option for it)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *self.raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_pages(app: FastAPI) -> None:
    """Add the page routes and the two static folders to `app` (built with docs_url=None, redoc_url=None)."""
    app.include_router(router)
    # /static/index.html is the page itself, so it gets the page's policy.
    app.mount("/static", _WithHeaders(StaticFiles(directory=STATIC_DIR), _PAGE_SECURITY), name="static")
    app.mount("/docs-assets", _WithHeaders(StaticFiles(directory=DOCS_ASSETS_DIR), _ASSET_HEADERS), name="docs-assets")
