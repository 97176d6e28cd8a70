"""GET /metrics: Prometheus' text format, behind the API key like every route but /health and /ready."""

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.exchanges.metrics import Metrics

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {
                "text/plain": {
                    "example": "# TYPE minivault_in_flight gauge\nminivault_in_flight 1.0\n"
                    'minivault_requests_total{endpoint="rest",model="tinyllama:1.1b-chat",'
                    'status="200"} 42.0\n'
                }
            },
        }
    },  # fmt: skip
)
async def metrics(request: Request) -> Response:
    """Request counts, in-flight and queued gauges, latency and time-to-first-token histograms, tokens, log lines."""
    registry: Metrics = request.app.state.metrics
    body = await asyncio.to_thread(registry.render)
    return Response(body, media_type=registry.content_type)
