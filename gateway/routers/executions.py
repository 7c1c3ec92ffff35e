"""`/v1/executions`: see the module's routes."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/executions", tags=["campaigns"])
