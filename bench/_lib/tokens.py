"""A caller's LiveKit access token."""

from __future__ import annotations

from typing import Protocol

from livekit import api

__all__ = ["Credentials", "caller_token"]


class Credentials(Protocol):
    """A LiveKit API key and secret (``LiveKitServer``, ``LiveKitSettings``)."""

    @property
    def api_key(self) -> str: ...

    @property
    def api_secret(self) -> str: ...


def caller_token(creds: Credentials, room: str, identity: str) -> str:
    """A token that lets ``identity`` join ``room`` as a standard participant."""
    return (
        api.AccessToken(creds.api_key, creds.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
