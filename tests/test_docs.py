"""The API's own documentation: a worked example for every operation, and /docs and /redoc that load
everything they need from MiniVault itself (the browser side is in tests/test_page.py)."""

import re
from pathlib import Path
from typing import Any

import httpx

from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import serve_in_thread


def has_example(node: Any, components: dict[str, Any], depth: int = 0) -> bool:
    """An `example`/`examples` anywhere under `node`, following `$ref`s into the components."""
    if depth > 8:
        return False
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        if "$ref" in node:
            return has_example(components[node["$ref"].rsplit("/", 1)[-1]], components, depth + 1)
        return any(has_example(value, components, depth + 1) for value in node.values())
    if isinstance(node, list):
        return any(has_example(value, components, depth + 1) for value in node)
    return False


def test_every_operation_has_a_worked_example(log_path: Path) -> None:
    schema = create_app(make_settings(log_path=log_path)).openapi()
    components = schema["components"]["schemas"]
    missing = []
    operations = 0
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            operations += 1
            answers = {
                code: r for code, r in operation["responses"].items() if code.startswith("2") or code == "default"
            }
            parts = (operation.get("requestBody"), operation.get("parameters"), answers)
            if not any(has_example(part, components) for part in parts):
                missing.append(f"{method.upper()} {path}")

    assert missing == []
    assert operations >= 32
    assert "WS /ws/generate" in schema["info"]["description"]


def test_docs_and_redoc_load_their_assets_from_minivault_only(log_path: Path) -> None:
    with serve_in_thread(create_app(make_settings(log_path=log_path))) as server:
        pages = {path: httpx.get(f"{server.url}{path}") for path in ("/docs", "/redoc")}
        urls = {path: re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
                for path, page in pages.items()}  # fmt: skip
        assets = {
            url: httpx.get(f"{server.url}{url}") for found in urls.values() for url in found if url != "/openapi.json"
        }

    assert all(page.status_code == 200 for page in pages.values())
    assert not re.search(r"https?://", pages["/docs"].text + pages["/redoc"].text)
    assert set(assets) == {
        "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png",
        "/docs-assets/redoc.standalone.js",
    }  # fmt: skip
    assert all(response.status_code == 200 and len(response.content) > 1000 for response in assets.values())
    assert "SwaggerUIBundle" in assets["/docs-assets/swagger-ui-bundle.js"].text
