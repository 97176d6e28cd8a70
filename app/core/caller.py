"""Who is asking: one frozen value built once at the edge and carried by the exchange."""

from dataclasses import dataclass

from app.schemas import Endpoint


@dataclass(frozen=True, slots=True)
class Caller:
    """The request id, the endpoint it came through, the client's address, and its key (id and role)."""

    request_id: str
    endpoint: Endpoint
    client: str | None = None
    # None with auth off; else the id of the key presented (never the key itself).
    key_id: str | None = None
    # An admin key may continue any key's conversation and manage models.
    admin: bool = False
