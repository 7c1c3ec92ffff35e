"""`/v1/contacts`: see the module's routes."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/contacts", tags=["contacts"])
