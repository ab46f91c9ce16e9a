"""paramcast.v1.ParamService over grpc.aio: convert messages, delegate to ServiceCore, convert back.

Errors are not handled here: the typed errors the core raises reach `ErrorInterceptor`
(cloud/service/interceptor.py), which maps them to status codes for every method alike.
"""

from __future__ import annotations

import time

import grpc

from paramcast.cloud.service.core import GenerateCall, ModelListing, PackageChunk, ServiceCore
from paramcast.cloud.service.metrics import ServiceMetrics
from paramcast.common.serde import encoded_to_proto, encoding_from_proto
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc


def metadata_of(context) -> dict[str, str]:
    """A call's text metadata (a grpc.aio context or Ray Serve's copy of one); the last value of a key wins."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def generate_call(request: pb.GenerateRequest) -> GenerateCall:
    return GenerateCall(
        model_id=request.model_id,
        base_version=request.base_version,
        device_id=request.device_id,
        window=request.window,
        encoding=encoding_from_proto(request.encoding),
        keep_ratio=request.keep_ratio,
        catalogue_window=request.catalogue_window,
    )


def models_message(listing: list[ModelListing]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelInfo(model_id=m.model_id, base_versions=m.base_versions, latest_version=m.latest_version)
        for m in listing
    ])


def chunk_message(c: PackageChunk) -> pb.GetModelResponse:
    return pb.GetModelResponse(model_id=c.model_id, version=c.version, total_size=c.total_size,
                               archive_sha256=c.archive_sha256, offset=c.offset, data=c.data,
                               chunk_sha256=c.chunk_sha256)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()  # seconds, None without a deadline
    return None if remaining is None else time.monotonic() + remaining


def peer_address(peer: str | None) -> str | None:
    """The caller's address without its port: "ipv4:10.0.0.7:51234" -> "10.0.0.7",
    "ipv6:[::1]:51234" -> "::1"; other transports (unix sockets) as gRPC names them."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class ParamServicer(pb_grpc.ParamServiceServicer):
    def __init__(self, core: ServiceCore, metrics: ServiceMetrics):
        self.core, self.metrics = core, metrics

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        # encoded in its batch:
        encoded = await self.core.generate(generate_call(request), metadata_of(context), _deadline(context),
                                           peer_address(context.peer()))
        response = pb.GenerateResponse(bundle=encoded_to_proto(encoded))
        self.metrics.sent("Generate", response.ByteSize(), bundle=True)
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        chunks = self.core.get_model(request.model_id, request.version, request.offset, request.chunk_size,
                                     metadata_of(context), peer_address(context.peer()))
        for c in chunks:
            response = chunk_message(c)
            self.metrics.sent("GetModel", response.ByteSize())
            yield response

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext,
                         ) -> pb.ListModelsResponse:
        return models_message(self.core.list_models(metadata_of(context)))
