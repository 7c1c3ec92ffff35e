"""`/v1/segments`: see the module's routes."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/segments", tags=["segments"])
