"""Batch scoring through the inference service (`--via-service`) instead of ONNX
Runtime in process: the same chunks, model inputs and output, but each batch of rows is
one KServe v2 ModelInfer call, and each row records the version that answered.

Addressing. The inference service routes a request by model name through the route
table it follows from the registry (its aliases and rollout policy), or serves the
version a request names; it does not take an alias in a request. So `name/VERSION`
pins the version, and `name@alias` sends the name alone and checks the `route`
parameter of every answer: an answer routed by another alias (a canary share of a
rollout policy) fails the job rather than mixing another alias's predictions in. A
version the alias moves to during the job answers from then on; each row's
`model_version` is the one that answered (`response.model_version`), not the one
resolved at the start.

Feature-bundle models: the point-in-time join stays on this side (the service's own
enrichment reads the online store *now*, not at each row's timestamp), and the
assembled tensor is sent under the model's input name: the service runs batches that
carry the tensor as they are.

Each call has a deadline (`timeout`); at most `in_flight` calls are in flight at once;
a request holds at most the served model's `max_batch_size` rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from modelplane.client.credentials import ClientCredentials
from modelplane.client.inference import CannotConnect, InferenceClient, Prediction
from modelplane.scoring.model import ModelRef


class ServiceScoringError(RuntimeError):
    """The inference service could not score a batch (unreachable, refused, routed
    elsewhere)."""


@dataclass(frozen=True)
class ServiceOptions:
    address: str
    batch_rows: int
    in_flight: int = 4
    timeout_s: float = 30.0
    credentials: ClientCredentials | None = None


def _rpc_message(exc: grpc.RpcError) -> str:
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    return f"{code.name}: {details}"


class ServiceModel:
    """A registry model scored by the inference service at `options.address`."""

    def __init__(
        self, ref: ModelRef, input_name: str, output_names: list[str], options: ServiceOptions
    ) -> None:
        if options.in_flight < 1 or options.timeout_s <= 0:
            raise ValueError("--service-in-flight >= 1 and --service-timeout > 0")
        self.ref = ref
        self.input_name = input_name
        self.output_names = list(output_names)
        self.options = options
        self.version = str(ref.version) if ref.version else ""
        self.client = InferenceClient(
            options.address, timeout=options.timeout_s, credentials=options.credentials
        )
        self._pool = ThreadPoolExecutor(options.in_flight, thread_name_prefix="via-service")
        self.rows_per_request = options.batch_rows
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _where(self) -> str:
        return f"inference service {self.options.address}"

    def _check(self) -> None:
        """Fails fast: nothing answers, or the service does not serve the model (or the
        pinned version); learns the largest request the model takes."""
        try:
            config = self.client.config(self.ref.name, self.version)
        except CannotConnect as exc:
            raise ServiceScoringError(f"{self._where()}: {exc}") from None
        except grpc.RpcError as exc:
            served = f"{self.ref.name}/{self.version}" if self.version else self.ref.name
            raise ServiceScoringError(
                f"{self._where()} does not serve {served}: {_rpc_message(exc)}"
            ) from None
        if config.max_batch_size > 0:
            self.rows_per_request = min(self.rows_per_request, config.max_batch_size)

    def _call(self, x: np.ndarray) -> Prediction:
        try:
            prediction = self.client.predict(
                self.ref.name,
                {self.input_name: x},
                version=self.version,
                outputs=self.output_names,
            )
        except CannotConnect as exc:
            raise ServiceScoringError(f"{self._where()}: {exc}") from None
        except grpc.RpcError as exc:
            raise ServiceScoringError(
                f"{self._where()}: ModelInfer {self.ref}: {_rpc_message(exc)}"
            ) from None
        if self.ref.alias and prediction.route and prediction.route != self.ref.alias:
            raise ServiceScoringError(
                f"{self._where()} routed a request for {self.ref} by alias "
                f"{prediction.route!r} (version {prediction.model_version}): its rollout "
                f"policy splits {self.ref.name}'s requests; give NAME/VERSION to score one "
                "version"
            )
        missing = [n for n in self.output_names if n not in prediction.outputs]
        if missing:
            raise ServiceScoringError(f"{self._where()}: the answer lacks outputs {missing}")
        return prediction

    def run(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every output for every row of `x`, `rows_per_request` rows per call, at most
        `in_flight` calls at once, in the rows' order; and each row's version."""
        size = self.rows_per_request
        pieces = [x[b : b + size] for b in range(0, len(x), size)]
        predictions = list(self._pool.map(self._call, pieces))
        outputs = {
            name: (
                np.concatenate([p.outputs[name] for p in predictions])
                if predictions
                else np.empty((0,), np.float32)
            )
            for name in self.output_names
        }
        versions = np.empty(len(x), np.int64)
        for index, prediction in enumerate(predictions):
            begin = index * size
            try:
                number = int(prediction.model_version)
            except ValueError:
                raise ServiceScoringError(
                    f"{self._where()} answered with version {prediction.model_version!r}; "
                    "expected a registry version number"
                ) from None
            versions[begin : begin + len(pieces[index])] = number
        return outputs, versions

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
