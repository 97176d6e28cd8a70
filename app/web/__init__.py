"""The ASGI edge: connection guards, the browser guard, request ids, keys, body limits, responses and routes' deps."""
