"""HTTP and WebSocket routes; each module owns one part of the API."""
