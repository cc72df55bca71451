"""A grpcurl-style client: find a method through server reflection, call it with JSON.

Nothing about the service is compiled in: the request and response types come from the
server's reflection service (``grpc.reflection.v1alpha``) into a private descriptor pool,
requests are parsed from the proto3 JSON mapping and responses printed in it. So the same
client calls the notes service, the health service, or any other reflected service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from netstack.config import RPCClientConfig, parse_hostport

# A CLI call without --deadline: unary calls get this many seconds, streams run until done.
DEFAULT_UNARY_DEADLINE = 10.0


class CallError(Exception):
    """The call could not be made or failed; exit 1 with this one line."""


class UsageError(Exception):
    """METHOD or the JSON request is malformed; exit 2 with this one line."""


class CallFailed(CallError):
    """The server answered with a non-OK status: ``CODE_NAME: details``."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(f"{code.name}: {details or '(no details)'}")
        self.code = code
        self.details = details or ""


def split_method(name: str) -> tuple[str, str]:
    """``pkg.Service/Method`` or ``pkg.Service.Method`` -> (service, method).

    Raises:
        UsageError: the name has no service part.
    """
    service, sep, method = name.lstrip("/").rpartition("/")
    if not sep:
        service, sep, method = name.rpartition(".")
    if not sep or not service or not method:
        raise UsageError(
            f"METHOD: expected package.Service/Method (e.g. notes.v1.Notes/GetNote), got {name!r}"
        )
    return service, method


class ReflectionClient:
    """One channel to a server, with the descriptors its reflection service offers.

    Args:
        cfg: where to connect, the bearer token and the deadline.
    """

    def __init__(self, cfg: RPCClientConfig) -> None:
        self.cfg = cfg
        host, port = parse_hostport(cfg.connect, field="connect")
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if cfg.tls.cafile is not None:
            try:
                roots = Path(cfg.tls.cafile).read_bytes()
            except OSError as exc:
                raise UsageError(f"cafile: cannot read {cfg.tls.cafile}: {exc.strerror}") from None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self._db = ProtoReflectionDescriptorDatabase(self.channel)
        self._pool = descriptor_pool.DescriptorPool(self._db)
        self._connected = False

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ReflectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        if self._connected:
            return
        wait = self.cfg.deadline or DEFAULT_UNARY_DEADLINE
        try:
            grpc.channel_ready_future(self.channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise CallError(f"cannot connect to {self.cfg.connect} within {wait:g}s") from None
        self._connected = True

    def _reflect(self, what: str, fn: Any, *args: Any) -> Any:
        self._connect()
        try:
            return fn(*args)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise CallError(
                    f"{self.cfg.connect} does not offer server reflection, needed to {what}"
                ) from None
            raise CallFailed(code, exc.details()) from None
        except KeyError:
            raise CallError(f"{self.cfg.connect}: {what}: not found") from None

    def services(self) -> list[str]:
        """Full names of the services the server reflects, sorted."""
        names: list[str] = self._reflect("list services", self._db.get_services)
        return sorted(names)

    def methods(self, service: str) -> list[str]:
        """``Service.Method ( Request ) returns ( [stream] Response )`` lines."""
        desc = self._reflect(f"find service {service}", self._pool.FindServiceByName, service)
        lines = []
        for m in desc.methods:
            stream_in = "stream " if m.client_streaming else ""
            stream_out = "stream " if m.server_streaming else ""
            lines.append(
                f"{desc.full_name}.{m.name} ( {stream_in}{m.input_type.full_name} ) "
                f"returns ( {stream_out}{m.output_type.full_name} )"
            )
        return lines

    def method(self, name: str) -> MethodDescriptor:
        """Resolve ``pkg.Service/Method`` through reflection."""
        service, method = split_method(name)
        desc = self._reflect(f"find service {service}", self._pool.FindServiceByName, service)
        found: MethodDescriptor | None = desc.methods_by_name.get(method)
        if found is None:
            known = ", ".join(m.name for m in desc.methods)
            raise CallError(f"service {service} has no method {method!r} (it has: {known})")
        return found

    def call(self, name: str, data: str) -> Iterator[dict[str, Any]]:
        """Call ``name`` with the JSON ``data``; yield each response as a JSON object.

        Raises:
            UsageError: ``data`` is not valid JSON for the request type.
            CallError: the method cannot be found or the server answered an error.
        """
        method = self.method(name)
        if method.client_streaming:
            raise UsageError(f"{name} takes a stream of requests: not supported by rpc call")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        try:
            request = json_format.Parse(data, request_cls())
        except json_format.ParseError as exc:
            raise UsageError(f"--data: not a valid {method.input_type.full_name}: {exc}") from None
        path = f"/{method.containing_service.full_name}/{method.name}"
        metadata: tuple[tuple[str, str | bytes], ...] = (
            (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else ()
        )
        deadline = self.cfg.deadline
        if deadline is None and not method.server_streaming:
            deadline = DEFAULT_UNARY_DEADLINE
        try:
            if method.server_streaming:
                stream = self.channel.unary_stream(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                for response in stream(request, timeout=deadline, metadata=metadata):
                    yield _to_json(response)
            else:
                unary = self.channel.unary_unary(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                yield _to_json(unary(request, timeout=deadline, metadata=metadata))
        except grpc.RpcError as exc:
            raise CallFailed(exc.code(), exc.details()) from None


def _to_json(message: Message) -> dict[str, Any]:
    text = json_format.MessageToJson(message, always_print_fields_with_no_presence=True)
    result: dict[str, Any] = json.loads(text)
    return result
