"""The inference service with authentication on: unloading a model needs `admin` (the
issue's `RepositoryModelUnload` by anyone), predicting needs `reader`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.kernel.auth import add_token, bearer_metadata
from tests.integration.inference.conftest import fp32_request, serving


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined, no-any-return]


def test_repository_model_unload_needs_admin(repository: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    reader = bearer_metadata(add_token(path, "app", ["reader"]))
    approver = bearer_metadata(add_token(path, "alice", ["approver", "writer"]))
    admin = bearer_metadata(add_token(path, "ops", ["admin"]))
    unload = pb.RepositoryModelUnloadRequest(model_name="light")
    x = np.ones((2, 64), dtype=np.float32)
    with serving(repository, auth_tokens_file=path) as (_, stub):
        assert _code(lambda: stub.RepositoryModelUnload(unload, timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        for metadata in (reader, approver):
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelUnload(unload, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        # Denied calls changed nothing: the model still serves.
        assert stub.ModelReady(
            pb.ModelReadyRequest(name="light"), metadata=reader, timeout=10
        ).ready
        stub.ModelInfer(fp32_request("light", x), metadata=reader, timeout=10)
        assert _code(lambda: stub.ModelInfer(fp32_request("light", x), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # An admin may unload (or be told why not by the service itself).
        try:
            stub.RepositoryModelUnload(unload, metadata=admin, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in (  # type: ignore[attr-defined]
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
