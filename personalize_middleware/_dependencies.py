"""Framework helpers: FastAPI dependencies (usable without importing FastAPI here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request

from ._exceptions import ConfigurationError
from ._models import Experience
from ._personalization import Personalization
from ._routes import validate_experience_key

__all__ = ["get_personalization", "require_experiences"]


def get_personalization(request: Request) -> Personalization:
    """The request's ``Personalization``; as a FastAPI dependency:
    ``personalize: Personalization = Depends(get_personalization)``."""
    handle = request.scope.get("state", {}).get("personalize")
    if not isinstance(handle, Personalization):
        raise ConfigurationError(
            "request.state.personalize is missing: add PersonalizeMiddleware to the app "
            "(app.add_middleware(PersonalizeMiddleware, ...))",
            field="middleware",
        )
    return handle


def require_experiences(
    *keys: str,
) -> Callable[[Request], Awaitable[dict[str, Experience]]]:
    """A dependency that fetches ``keys`` (the missing ones in ONE call, within the
    latency budget) and returns the matched experiences:
    ``offers: dict[str, Experience] = Depends(require_experiences("cart-upsell"))``."""
    for key in keys:
        validate_experience_key(key, where="require_experiences")

    async def dependency(request: Request) -> dict[str, Experience]:
        return await get_personalization(request).get_many(*keys)

    return dependency
