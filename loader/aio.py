"""asyncio twins of :mod:`loader.client` (``grpc.aio`` channel or stub).

Same requests, answers, errors and views as the sync functions: the LoadModel
exchange is :func:`loader.client.open_steps`, driven here with awaited calls.  What
blocks (mapping and populating a model's pages, copying to a CUDA device) runs on a
worker thread, so the event loop keeps serving while a big model is mapped.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
import torch

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from loader.client import (
    LoadedModel,
    advance,
    model_error,
    models_list,
    open_steps,
    place,
    tensors_from_response,
)

AioChannelLike: TypeAlias = "grpc.aio.Channel | pb_grpc.ModelsStub"


def _stub(target: AioChannelLike) -> pb_grpc.ModelsStub:
    return target if isinstance(target, pb_grpc.ModelsStub) else pb_grpc.ModelsStub(target)


async def _call(fn: Any, request: Any) -> Any:
    try:
        return await fn(request)
    except grpc.RpcError as exc:
        raise model_error(exc) from None


async def open_model(
    target: AioChannelLike,
    name: str,
    session_id: int = 0,
    pin: bool = True,
    populate: bool | None = None,
) -> LoadedModel:
    """:func:`loader.client.open_model` over ``grpc.aio``."""
    stub = _stub(target)
    steps = open_steps(name, session_id, pin, populate)
    step = advance(steps, None)
    while not isinstance(step, LoadedModel):
        resp = await _call(stub.LoadModel, step)
        step = await asyncio.to_thread(advance, steps, resp)
    return step


async def load_model(
    target: AioChannelLike,
    name: str,
    device: str | torch.device = "cpu",
    session_id: int = 0,
    pin: bool = True,
    populate: bool | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`loader.client.load_model` over ``grpc.aio``."""
    loaded = await open_model(target, name, session_id, pin, populate)
    return await asyncio.to_thread(place, loaded.tensors, device)


async def swap_models(
    target: AioChannelLike,
    old: str,
    new: str,
    device: str | torch.device = "cpu",
    session_id: int = 0,
    populate: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`loader.client.swap_models` over ``grpc.aio``."""
    resp = await _call(
        _stub(target).SwapModels,
        pb.SwapModelsRequest(session_id=session_id, old_name=old, new_name=new),
    )

    def tensors() -> dict[str, torch.Tensor]:
        return place(tensors_from_response(resp.model, populate), device)

    return await asyncio.to_thread(tensors)


async def prefetch_model(target: AioChannelLike, name: str) -> str:
    """:func:`loader.client.prefetch_model` over ``grpc.aio``."""
    resp = await _call(_stub(target).PrefetchModel, pb.PrefetchModelRequest(name=name))
    return str(resp.state)


async def release_model(
    target: AioChannelLike, name: str, session_id: int = 0, evict: bool = False
) -> int:
    """:func:`loader.client.release_model` over ``grpc.aio``."""
    resp = await _call(
        _stub(target).ReleaseModel,
        pb.ReleaseModelRequest(session_id=session_id, name=name, evict=evict),
    )
    return int(resp.released_pins)


async def list_models(target: AioChannelLike) -> list[dict[str, Any]]:
    """:func:`loader.client.list_models` over ``grpc.aio``."""
    return models_list(await _call(_stub(target).ListModels, pb.ListModelsRequest()))
