"""Client side of the Models service: tensors as views on the daemon's arena.

``load_model`` asks the daemon to make a model resident, maps the arena extent it
names and builds one ``torch.Tensor`` per tensor with ``torch.frombuffer``: views, no
copy.  The mapping is private (copy-on-write), so a client that writes into a tensor
changes only its own pages, never the resident copy other clients see.

With ``device="cuda"`` the host views are streamed to GPU memory through a ring of
pinned staging buffers (:mod:`loader.gpu`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
import torch

from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore._wire import is_session_lost
from loader.errors import (
    ModelBudgetError,
    ModelChecksumError,
    ModelError,
    ModelExistsError,
    ModelFormatError,
    ModelNotFoundError,
    ModelStoreError,
    ModelUnavailableError,
)
from loader.safetensors_format import DTYPES

ChannelLike: TypeAlias = "grpc.Channel | pb_grpc.ModelsStub | str"

_ERRORS: dict[grpc.StatusCode, type[ModelError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: ModelFormatError,
    grpc.StatusCode.ALREADY_EXISTS: ModelExistsError,
    grpc.StatusCode.DATA_LOSS: ModelChecksumError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ModelBudgetError,
    grpc.StatusCode.FAILED_PRECONDITION: ModelStoreError,
    grpc.StatusCode.UNAVAILABLE: ModelUnavailableError,
    grpc.StatusCode.CANCELLED: ModelUnavailableError,  # the daemon stopped mid-call
}


def _stub(target: ChannelLike) -> pb_grpc.ModelsStub:
    if isinstance(target, pb_grpc.ModelsStub):
        return target
    if isinstance(target, str):
        addr = target if "://" in target else f"unix://{target}"
        return pb_grpc.ModelsStub(grpc.insecure_channel(addr))
    return pb_grpc.ModelsStub(target)


def model_error(exc: grpc.RpcError) -> ModelError:
    """The :class:`ModelError` subclass of a failed Models call (sync or ``grpc.aio``)."""
    code = exc.code() if hasattr(exc, "code") else None
    cls = _ERRORS.get(code, ModelError) if code is not None else ModelError
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    err = cls(detail or str(code))
    if code is not None:
        err.code = code  # the status as received (e.g. CANCELLED)
    err.session_lost = is_session_lost(exc)
    return err


def _call(fn: Any, request: Any) -> Any:
    try:
        return fn(request)
    except grpc.RpcError as exc:
        raise model_error(exc) from None


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    dt = getattr(torch, DTYPES[st_dtype][1], None)
    if not isinstance(dt, torch.dtype):
        raise ModelFormatError(f"this torch has no dtype for {st_dtype}")
    return dt


MADV_POPULATE_READ = 22  # Linux >= 5.14; not exported by Python 3.11's mmap module


def tensors_from_response(
    resp: pb.LoadModelResponse, populate: bool = False
) -> dict[str, torch.Tensor]:
    """Maps the arena extent of a LoadModel response and builds the tensor views.

    Args:
        resp: the daemon's answer.
        populate: map every page now (one ``madvise(MADV_POPULATE_READ)``, which does
            not break copy-on-write) rather than fault them in one by one on first use.
    """
    fd = os.open(resp.shm_path, os.O_RDWR)
    try:
        # Private and writable: reads share the daemon's pages, writes stay local.
        mm = mmap.mmap(
            fd,
            resp.nbytes,
            mmap.MAP_PRIVATE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=resp.shm_offset,
        )
    finally:
        os.close(fd)
    if populate and resp.nbytes:
        with contextlib.suppress(OSError):  # older kernels: pages fault in on use
            mm.madvise(MADV_POPULATE_READ)
    out: dict[str, torch.Tensor] = {}
    for t in resp.tensors:
        dtype = torch_dtype(t.dtype)
        shape = tuple(t.shape)
        if t.nbytes == 0:
            out[t.name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(
            mm, dtype=dtype, count=t.nbytes // DTYPES[t.dtype][0], offset=t.offset
        )
        out[t.name] = flat.view(shape)
    return out


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Tensors of a loaded model and the daemon's answer (timings, residency)."""

    tensors: dict[str, torch.Tensor]
    info: pb.LoadModelResponse


OpenSteps: TypeAlias = Generator[pb.LoadModelRequest, pb.LoadModelResponse, LoadedModel]


def open_steps(name: str, session_id: int, pin: bool, populate: bool | None) -> OpenSteps:
    """The LoadModel exchange of :func:`open_model` without the I/O.

    Yields each request and is sent the daemon's answer; returns the
    :class:`LoadedModel`.  The sync and the asyncio clients drive it with
    :func:`advance`, so both speak the same protocol.
    """
    resp = yield pb.LoadModelRequest(session_id=session_id, name=name, no_pin=not pin, no_wait=True)
    loading = resp.state != "ready"
    fill = populate if populate is not None else loading
    tensors = tensors_from_response(resp, fill)
    if loading:
        first = resp
        # Waits for that load (a failure raises here: its error, not a second load).
        resp = yield pb.LoadModelRequest(
            session_id=session_id, name=name, no_pin=True, wait_load_id=first.load_id
        )
        where = (first.uid, first.shm_path, first.shm_offset)
        moved = (resp.uid, resp.shm_path, resp.shm_offset) != where
        if first.load_id:
            reloaded = resp.load_id != first.load_id
        else:  # a daemon without load ids: it may have loaded the model again
            reloaded = moved or not resp.was_resident
        if reloaded:
            # The first load is gone (unpinned and evicted; or, with a daemon without
            # load ids, failed with its pin), this call loaded it again, perhaps into
            # the same extent, or the model was re-registered meanwhile: pin the new one.
            if pin:
                resp = yield pb.LoadModelRequest(session_id=session_id, name=name)
                moved = (resp.uid, resp.shm_path, resp.shm_offset) != where
            if moved:
                tensors = tensors_from_response(resp, fill)
    return LoadedModel(tensors, resp)


def advance(
    steps: OpenSteps, resp: pb.LoadModelResponse | None
) -> pb.LoadModelRequest | LoadedModel:
    """Sends ``resp`` (``None`` to start) into ``steps``: the next request or the result.

    The result is returned, not raised as ``StopIteration`` (which cannot cross an
    ``asyncio`` future: the asyncio client runs this on a worker thread, since
    mapping and populating a model's pages blocks).
    """
    try:
        return steps.send(resp)  # type: ignore[arg-type]  # None starts the generator
    except StopIteration as done:
        return cast(LoadedModel, done.value)


def open_model(
    target: ChannelLike,
    name: str,
    session_id: int = 0,
    pin: bool = True,
    populate: bool | None = None,
) -> LoadedModel:
    """Like :func:`load_model` (host views only) but also returns the daemon's answer.

    The first call returns as soon as the model's extent is reserved; when the model
    is still being read, the client maps and populates its pages meanwhile (the
    arena's pages exist already, so this overlaps the disk for free), then waits for
    the bytes with a second call.  A model already resident is mapped lazily (faster
    than populating every page of a big model up front).
    """
    stub = _stub(target)
    steps = open_steps(name, session_id, pin, populate)
    step = advance(steps, None)
    while not isinstance(step, LoadedModel):
        step = advance(steps, _call(stub.LoadModel, step))
    return step


def load_model(
    target: ChannelLike,
    name: str,
    device: str | torch.device = "cpu",
    session_id: int = 0,
    pin: bool = True,
    populate: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Loads model ``name`` from the daemon.

    Args:
        target: a gRPC channel, a ``ModelsStub`` or a Unix socket path.
        name: the registered model.
        device: ``"cpu"`` (views on shared memory, no copy) or a CUDA device (copied
            to GPU memory through pinned buffers).
        session_id: the session that owns the pin (0: anonymous).
        pin: keep the model's bytes stable until :func:`release_model` / swap.
        populate: map every page before returning (no page faults on first use).
            Default: only while the daemon is still reading the model (free then);
            a resident model's pages map lazily on first use.

    Raises:
        ModelNotFoundError, ModelBudgetError, ModelChecksumError (naming the tensor), ...
    """
    loaded = open_model(target, name, session_id, pin, populate)
    return place(loaded.tensors, device)


def place(host: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """``host`` itself for ``"cpu"``; copies on the CUDA device ``device`` otherwise."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return host
    if dev.type == "cuda":
        from loader.gpu import copy_to_cuda

        return copy_to_cuda(host, dev)
    raise ValueError(f"unsupported device {device!r} (cpu or cuda)")


def swap_models(
    target: ChannelLike,
    old: str,
    new: str,
    device: str | torch.device = "cpu",
    session_id: int = 0,
    populate: bool = False,
) -> dict[str, torch.Tensor]:
    """Makes ``new`` resident and pinned, unpins ``old``; returns ``new``'s tensors."""
    resp = _call(
        _stub(target).SwapModels,
        pb.SwapModelsRequest(session_id=session_id, old_name=old, new_name=new),
    )
    return place(tensors_from_response(resp.model, populate), device)


def prefetch_model(target: ChannelLike, name: str) -> str:
    """Starts loading ``name`` into DRAM in the background; returns its state."""
    return str(_call(_stub(target).PrefetchModel, pb.PrefetchModelRequest(name=name)).state)


def release_model(target: ChannelLike, name: str, session_id: int = 0, evict: bool = False) -> int:
    """Drops the session's pins on ``name`` (its views must no longer be used)."""
    resp = _call(
        _stub(target).ReleaseModel,
        pb.ReleaseModelRequest(session_id=session_id, name=name, evict=evict),
    )
    return int(resp.released_pins)


def list_models(target: ChannelLike) -> list[dict[str, Any]]:
    """Registered models with their residency state."""
    return models_list(_call(_stub(target).ListModels, pb.ListModelsRequest()))


def models_list(resp: pb.ListModelsResponse) -> list[dict[str, Any]]:
    """The rows of a ListModels answer (what :func:`list_models` returns)."""
    return [
        {
            "name": m.name,
            "nbytes": m.nbytes,
            "tensor_bytes": m.tensor_bytes,
            "num_tensors": m.num_tensors,
            "state": m.state,
            "pins": m.pins,
            "source": m.source,
        }
        for m in resp.models
    ]
