"""The pages a browser opens: the playground at `/`, and Swagger UI and ReDoc served from local files.

Nothing here loads from the internet: the machine running MiniVault may be offline. The docs'
JavaScript and CSS come from the `fastapi-offline` package, which ships Swagger UI's and ReDoc's
release files, rather than from copies kept by hand.
"""

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
# What a browser needs before it can send a key: the page, the docs and the schema they read.
OPEN_PATHS = frozenset({"/", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs-assets/")
# ReDoc's menu footer shows Redocly's logo from their CDN, whatever the options say; this serves it from here.
_REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    """The chat page (app/static/index.html)."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="MiniVault - Swagger UI",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon.png",
        # The validator badge would ask validator.swagger.io about the schema.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="MiniVault - ReDoc",
        redoc_js_url="/docs-assets/redoc.standalone.js",
        redoc_favicon_url="/docs-assets/favicon.png",
        with_google_fonts=False,
    )


@cache
def _redoc_script() -> bytes:
    return (DOCS_ASSETS_DIR / "redoc.standalone.js").read_bytes().replace(_REDOC_LOGO, b"/docs-assets/favicon.png")


@router.get("/docs-assets/redoc.standalone.js")
def redoc_js() -> Response:
    """fastapi-offline's ReDoc bundle, its one internet address (the Redocly logo) pointed at a local image."""
    return Response(_redoc_script(), media_type="text/javascript; charset=utf-8")


def mount_pages(app: FastAPI) -> None:
    """Add the page routes and the two static folders to `app` (built with docs_url=None, redoc_url=None)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
