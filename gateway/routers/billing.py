"""`/v1/billing`: see the module's routes."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/billing", tags=["billing"])
