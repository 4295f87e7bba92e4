"""The inference API end to end: a real uvicorn server, real onnxruntime models, httpx.

``OnnxModelProvider`` stands in for the model repository (it is what the protocol layer
talks to) but runs real onnxruntime sessions over small ONNX models built here: an
Identity model per datatype and a two-input, two-output model in two versions. The other
protocol test modules import it and ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry

import fogline.cloud_service.errors as errors_module
from fogline import __version__
from fogline.cloud_service._auth import Scope, TokenStore, generate_token
from fogline.cloud_service._oip import BINARY_HEADER, DATATYPES
from fogline.cloud_service._oip_app import _Datatype, create_inference_app, http_status_for
from fogline.cloud_service._serving import ORT_DATATYPES, Lane, ModelMetadata, TensorSpec
from fogline.cloud_service.errors import (
    BackendError,
    CloudError,
    DeadlineExceededError,
    InferenceInputError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)
from tests.cloud_service.test_app import ServerThread

pytestmark = pytest.mark.integration

ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
MAX_BATCH = 8


def _model(
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    initializer: tuple[Any, ...] | list[Any] = (),
) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def identity_model(datatype: str, width: int = 3) -> bytes:
    """``y = x``, shape ``[batch, width]`` of ``datatype``."""
    t = ONNX_TYPES[datatype]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", t, ["batch", width])],
        [helper.make_tensor_value_info("y", t, ["batch", width])],
    )


def sum_product_model(offset: float) -> bytes:
    """``sum = a + b + offset``, ``product = a * b``; FP32 ``[batch, 4]``."""
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Add", ["ab", "off"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4])
            for n in ("sum", "product")
        ],
        [helper.make_tensor("off", TensorProto.FLOAT, [], [offset])],
    )


@dataclass
class _Loaded:
    session: ort.InferenceSession
    metadata: ModelMetadata


@dataclass
class Call:
    model: str
    version: str | None
    lane: Lane
    timeout_ms: float | None
    inputs: dict[str, np.ndarray]


@dataclass
class OnnxModelProvider:
    """A :class:`ModelProvider` over real onnxruntime sessions, with switches for the
    failure answers a repository gives (``faults``: model → error raised by ``infer``,
    ``not_ready``: models that report not ready)."""

    models: dict[str, dict[str, _Loaded]] = field(default_factory=dict)
    faults: dict[str, CloudError] = field(default_factory=dict)
    not_ready: set[str] = field(default_factory=set)
    server_ready: bool = True
    calls: list[Call] = field(default_factory=list)

    def add(self, name: str, version: str, onnx_bytes: bytes) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )

        def spec(arg: Any) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            return TensorSpec(arg.name, ORT_DATATYPES[arg.type], shape)

        versions = self.models.setdefault(name, {})
        versions[version] = _Loaded(
            session,
            ModelMetadata(
                name=name,
                version=version,
                platform="onnxruntime_onnx",
                inputs=tuple(spec(a) for a in session.get_inputs()),
                outputs=tuple(spec(a) for a in session.get_outputs()),
                max_batch_size=MAX_BATCH,
            ),
        )
        all_versions = tuple(sorted(versions, key=int))
        for loaded in versions.values():
            loaded.metadata = _with_versions(loaded.metadata, all_versions)

    def _resolve(self, model: str, version: str | None) -> _Loaded:
        versions = self.models.get(model)
        if versions is None:
            raise UnknownModelError(model)
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise UnknownModelError(model, version)
        return versions[version]

    @property
    def ready(self) -> bool:
        return self.server_ready

    def model_names(self) -> list[str]:
        return sorted(self.models)

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        return self._resolve(model, version).metadata

    def is_ready(self, model: str, version: str | None = None) -> bool:
        self._resolve(model, version)
        return model not in self.not_ready

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> dict[str, np.ndarray]:
        loaded = self._resolve(model, version)
        self.calls.append(Call(model, version, lane, timeout_ms, dict(inputs)))
        if model in self.not_ready:
            raise ModelNotReadyError(f"model {model!r} is loading")
        fault = self.faults.get(model)
        if fault is not None:
            raise fault
        feeds: dict[str, np.ndarray] = {}
        for spec in loaded.metadata.inputs:
            array = inputs[spec.name]
            if spec.datatype == "BYTES":
                # onnxruntime string tensors take str: it would str() a bytes object.
                try:
                    array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
                except UnicodeDecodeError:
                    raise InferenceInputError(
                        f"input {spec.name!r}: this model takes UTF-8 text only"
                    ) from None
            feeds[spec.name] = array
        names = [o.name for o in loaded.metadata.outputs]
        values = await asyncio.to_thread(loaded.session.run, names, feeds)
        out: dict[str, np.ndarray] = {}
        for spec, value in zip(loaded.metadata.outputs, values, strict=True):
            out[spec.name] = (
                np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
                if spec.datatype == "BYTES"
                else value
            )
        return out


def _with_versions(meta: ModelMetadata, versions: tuple[str, ...]) -> ModelMetadata:
    return ModelMetadata(
        name=meta.name,
        version=meta.version,
        platform=meta.platform,
        inputs=meta.inputs,
        outputs=meta.outputs,
        max_batch_size=meta.max_batch_size,
        versions=versions,
    )


def make_provider() -> OnnxModelProvider:
    """Identity models ``identity_<datatype>`` for every datatype; ``sum_product`` in
    versions 1 and 2 (2 adds 100 to ``sum``); ``busy``, ``late``, ``broken`` and
    ``loading`` (FP32 identities that fail the way their names say)."""
    provider = OnnxModelProvider()
    for datatype in ONNX_TYPES:
        provider.add(f"identity_{datatype.lower()}", "1", identity_model(datatype))
    provider.add("sum_product", "1", sum_product_model(0.0))
    provider.add("sum_product", "2", sum_product_model(100.0))
    fp32 = identity_model("FP32")
    for name in ("busy", "late", "broken", "loading"):
        provider.add(name, "1", fp32)
    provider.faults["busy"] = QueueFullError(depth=64, retry_after_ms=1500)
    provider.faults["late"] = DeadlineExceededError("not served within 5 ms; rejected")
    provider.faults["broken"] = BackendError("the session crashed")
    provider.not_ready.add("loading")
    return provider


@dataclass
class Tokens:
    """One token per scope combination, plus the store that accepts them."""

    infer: str
    read: str
    admin: str
    both: str
    store: TokenStore

    def header(self, which: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, which)}"}


def make_tokens() -> Tokens:
    minted = {
        "infer": generate_token("app", [Scope.INFER]),
        "read": generate_token("dashboard", [Scope.READ]),
        "admin": generate_token("ops", [Scope.ADMIN]),
        "both": generate_token("client", [Scope.INFER, Scope.READ]),
    }
    return Tokens(
        **{k: secret for k, (secret, _) in minted.items()},
        store=TokenStore(entry for _, entry in minted.values()),
    )


@contextlib.contextmanager
def serve(provider: OnnxModelProvider, **kwargs: Any) -> Iterator[ServerThread]:
    """The inference app over ``provider`` on a real uvicorn server on a free port."""
    with ServerThread(create_inference_app(provider, **kwargs)) as server:
        yield server


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> OnnxModelProvider:
    return make_provider()


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return make_tokens()


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def server(
    provider: OnnxModelProvider, tokens: Tokens, registry: CollectorRegistry
) -> Iterator[ServerThread]:
    with serve(provider, auth=tokens.store, max_request_bytes=64 * 1024, registry=registry) as srv:
        yield srv


@pytest.fixture
def http(server: ServerThread, tokens: Tokens) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=tokens.header("both"), timeout=10) as c:
        yield c


@pytest.fixture
def anon(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def fp32_request(rows: int = 2, **extra: Any) -> dict[str, Any]:
    data = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3], "data": data.tolist()}]
    }
    body.update(extra)
    return body


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message
    return message


# -- health and metadata ----------------------------------------------------------------


def test_health_endpoints_answer_without_a_token(anon: httpx.Client) -> None:
    assert anon.get("/v2/health/live").json() == {"live": True}
    assert anon.get("/v2/health/ready").json() == {"ready": True}


def test_server_ready_turns_503_while_models_load(
    anon: httpx.Client, provider: OnnxModelProvider
) -> None:
    provider.server_ready = False
    try:
        r = anon.get("/v2/health/ready")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert anon.get("/v2/health/live").status_code == 200
    finally:
        provider.server_ready = True
    assert anon.get("/v2/health/ready").status_code == 200


def test_server_metadata_names_the_binary_extension(http: httpx.Client) -> None:
    assert http.get("/v2").json() == {
        "name": "fogline",
        "version": __version__,
        "extensions": ["binary_tensor_data"],
    }


def test_model_metadata_lists_inputs_outputs_and_versions(http: httpx.Client) -> None:
    meta = http.get("/v2/models/sum_product").json()
    assert meta == {
        "name": "sum_product",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "b", "datatype": "FP32", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "product", "datatype": "FP32", "shape": [-1, 4]},
        ],
    }
    assert http.get("/v2/models/sum_product/versions/1").json() == meta


def test_metadata_of_an_unknown_model_or_version_is_404(http: httpx.Client) -> None:
    assert_error(http.get("/v2/models/nope"), 404, "nope")
    assert_error(http.get("/v2/models/sum_product/versions/7"), 404, "'7'")
    assert_error(http.get("/v2/models/nope/ready"), 404)
    assert_error(http.get("/v2/models/sum_product/versions/7/ready"), 404)


def test_model_ready_is_200_when_loaded_and_503_while_loading(http: httpx.Client) -> None:
    assert http.get("/v2/models/identity_fp32/ready").json() == {
        "name": "identity_fp32",
        "ready": True,
    }
    assert http.get("/v2/models/sum_product/versions/2/ready").status_code == 200
    r = http.get("/v2/models/loading/ready")
    assert r.status_code == 503
    assert r.json()["ready"] is False


def test_unknown_paths_and_methods_answer_in_the_error_format(http: httpx.Client) -> None:
    assert_error(http.get("/v2/nothing/here"), 404)
    assert_error(http.delete("/v2/models/identity_fp32"), 405)


# -- inference --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [[True, False, True], [False, False, True]]),
        ("UINT8", [[0, 1, 255], [7, 8, 9]]),
        ("UINT16", [[0, 1, 65535], [7, 8, 9]]),
        ("UINT32", [[0, 1, 2**32 - 1], [7, 8, 9]]),
        ("UINT64", [[0, 1, 2**64 - 1], [7, 8, 9]]),
        ("INT8", [[-128, 0, 127], [7, 8, 9]]),
        ("INT16", [[-(2**15), 0, 2**15 - 1], [7, 8, 9]]),
        ("INT32", [[-(2**31), 0, 2**31 - 1], [7, 8, 9]]),
        ("INT64", [[-(2**63), 0, 2**63 - 1], [7, 8, 9]]),
        ("FP16", [[0.5, -1.0, 65504.0], [7, 8, 9]]),
        ("FP32", [[0.25, -1.5, 3.0e38], [7, 8, 9]]),
        ("FP64", [[0.1, -1.5, 1e308], [7, 8, 9]]),
        ("BYTES", [["a", "", "héllo"], ["x", "y", "z"]]),
    ],
)
def test_json_inference_round_trips_every_datatype(
    http: httpx.Client, datatype: str, values: list[list[Any]]
) -> None:
    model = f"identity_{datatype.lower()}"
    body = {
        "id": f"req-{datatype}",
        "inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": values}],
    }
    r = http.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["id"] == f"req-{datatype}"
    assert answer["model_name"] == model
    assert answer["model_version"] == "1"
    (out,) = answer["outputs"]
    assert out["name"] == "y"
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 3]
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        assert out["data"] == [v for row in values for v in row]
    else:
        # Compared in the model's dtype: 3e38 as FP32 reads back as 3.0000000054977558e38.
        got = np.array(out["data"], dtype=dtype)
        assert np.array_equal(got, np.array(values, dtype=dtype).ravel())


@pytest.mark.parametrize("datatype", sorted(ONNX_TYPES))
def test_binary_inference_round_trips_every_datatype(http: httpx.Client, datatype: str) -> None:
    rng = np.random.default_rng(3)
    if datatype == "BYTES":
        array = np.array([[b"abc", b"", "é".encode()], [b"1", b"22", b"333"]], dtype=object)
        blob = b"".join(len(b).to_bytes(4, "little") + b for b in array.ravel())
    elif datatype == "BOOL":
        array = rng.integers(0, 2, (2, 3)).astype(bool)
        blob = array.tobytes()
    else:
        dtype = DATATYPES[datatype]
        raw = rng.integers(0, 120, (2, 3))
        array = raw.astype(dtype)
        blob = array.astype(dtype.newbyteorder("<")).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = http.post(
        f"/v2/models/identity_{datatype.lower()}/infer",
        content=header + blob,
        headers={BINARY_HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers[BINARY_HEADER])
    answer = json.loads(r.content[:length])
    (out,) = answer["outputs"]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 3]
    assert out["parameters"] == {"binary_data_size": len(blob)}
    assert "data" not in out
    assert r.content[length:] == blob


def test_requested_outputs_choose_subset_order_and_form(http: httpx.Client) -> None:
    a = np.ones((1, 4), dtype=np.float32)
    b = np.full((1, 4), 2.0, dtype=np.float32)
    blob = b.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": a.ravel().tolist()},
                {
                    "name": "b",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": len(blob)},
                },
            ],
            "outputs": [
                {"name": "product", "parameters": {"binary_data": True}},
                {"name": "sum"},
            ],
        }
    ).encode()
    r = http.post(
        "/v2/models/sum_product/infer",
        content=header + blob,
        headers={BINARY_HEADER: str(len(header))},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers[BINARY_HEADER])
    answer = json.loads(r.content[:length])
    assert answer["model_version"] == "2"
    product, total = answer["outputs"]
    assert product["name"] == "product"
    assert product["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(r.content[length:], "<f4").tolist() == [2.0] * 4
    assert total == {"name": "sum", "datatype": "FP32", "shape": [1, 4], "data": [103.0] * 4}


def test_one_requested_output_returns_only_that_output(http: httpx.Client) -> None:
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
            for n in ("a", "b")
        ],
        "outputs": [{"name": "product"}],
    }
    answer = http.post("/v2/models/sum_product/versions/1/infer", json=body).json()
    assert answer["model_version"] == "1"
    assert [o["name"] for o in answer["outputs"]] == ["product"]
    assert answer["outputs"][0]["data"] == [1.0, 4.0, 9.0, 16.0]


def test_binary_data_output_sends_every_output_as_binary(http: httpx.Client) -> None:
    body = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
            for n in ("a", "b")
        ],
    }
    r = http.post("/v2/models/sum_product/versions/1/infer", json=body)
    length = int(r.headers[BINARY_HEADER])
    outputs = json.loads(r.content[:length])["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in outputs] == [16, 16]
    values = np.frombuffer(r.content[length:], "<f4")
    assert values.tolist() == [2.0, 4.0, 6.0, 8.0, 1.0, 4.0, 9.0, 16.0]


def test_a_gzip_compressed_request_is_accepted(http: httpx.Client) -> None:
    raw = json.dumps(fp32_request()).encode()
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=gzip.compress(raw),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_the_request_goes_to_the_interactive_lane_with_its_timeout(
    http: httpx.Client, provider: OnnxModelProvider
) -> None:
    before = len(provider.calls)
    ok = http.post(
        "/v2/models/identity_fp32/infer", json=fp32_request(parameters={"timeout_ms": 250})
    )
    assert ok.status_code == 200
    triton_style = fp32_request(parameters={"timeout": 40_000, "custom": "kept"})
    assert http.post("/v2/models/identity_fp32/infer", json=triton_style).status_code == 200
    first, second = provider.calls[before:]
    assert (first.model, first.version, first.lane, first.timeout_ms) == (
        "identity_fp32",
        "1",
        Lane.INTERACTIVE,
        250.0,
    )
    assert second.timeout_ms == 40.0
    assert first.inputs["x"].dtype == np.float32
    assert first.inputs["x"].shape == (2, 3)


def test_a_request_without_id_gets_a_response_without_id(http: httpx.Client) -> None:
    answer = http.post("/v2/models/identity_fp32/infer", json=fp32_request()).json()
    assert "id" not in answer


# -- bad requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "not valid JSON"),
        (b'{"inputs": 3}', "'inputs' must be a list"),
        (b'{"inputs": [{"name": "x"}]}', "datatype"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b'{"inputs": [], "id": 5}', "'id' must be a string"),
    ],
)
def test_malformed_bodies_are_400(http: httpx.Client, content: bytes, fragment: str) -> None:
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, fragment)


def test_wrong_shape_is_400(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}
    assert_error(http.post("/v2/models/identity_fp32/infer", json=body), 400, "shape [2, 4]")


def test_data_that_does_not_fill_the_shape_is_400(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 5}]}
    assert_error(http.post("/v2/models/identity_fp32/infer", json=body), 400, "5 elements")


def test_infer_rejects_wrong_datatype_with_400(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert_error(http.post("/v2/models/identity_fp32/infer", json=body), 400, "INT32", "FP32")


def test_infer_rejects_strings_where_numbers_belong(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, "2", 3]}]}
    assert_error(http.post("/v2/models/identity_fp32/infer", json=body), 400, "element 1")


def test_a_batch_above_the_model_maximum_is_400(http: httpx.Client) -> None:
    assert_error(
        http.post("/v2/models/identity_fp32/infer", json=fp32_request(rows=MAX_BATCH + 1)),
        400,
        "batch size 9",
    )


def test_an_unknown_input_or_a_missing_one_is_400(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert_error(http.post("/v2/models/identity_fp32/infer", json=body), 400, "'z'")
    assert_error(
        http.post("/v2/models/identity_fp32/infer", json={"inputs": []}), 400, "needs input"
    )


def test_an_unknown_requested_output_is_400(
    http: httpx.Client, provider: OnnxModelProvider
) -> None:
    before = len(provider.calls)
    r = http.post("/v2/models/identity_fp32/infer", json=fp32_request(outputs=[{"name": "nope"}]))
    assert_error(r, 400, "'nope'")
    assert len(provider.calls) == before  # refused before reaching the model


def test_binary_data_whose_size_disagrees_is_400(http: httpx.Client) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=header + b"\0" * 8,
        headers={BINARY_HEADER: str(len(header))},
    )
    assert_error(r, 400, "needs 12")
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=header,
        headers={BINARY_HEADER: str(len(header) + 5)},
    )
    assert_error(r, 400, BINARY_HEADER)


def test_text_that_is_not_utf8_in_a_string_model_is_400(http: httpx.Client) -> None:
    blob = b"".join(len(b).to_bytes(4, "little") + b for b in (b"\xff", b"a", b"b"))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    r = http.post(
        "/v2/models/identity_bytes/infer",
        content=header + blob,
        headers={BINARY_HEADER: str(len(header))},
    )
    assert_error(r, 400, "UTF-8")


def test_an_unsupported_content_encoding_is_415(http: httpx.Client) -> None:
    r = http.post(
        "/v2/models/identity_fp32/infer",
        content=b"{}",
        headers={"Content-Encoding": "br"},
    )
    assert_error(r, 415, "br")


def test_infer_on_an_unknown_model_or_version_is_404(http: httpx.Client) -> None:
    assert_error(http.post("/v2/models/nope/infer", json=fp32_request()), 404, "'nope'")
    assert_error(
        http.post("/v2/models/identity_fp32/versions/3/infer", json=fp32_request()), 404, "'3'"
    )


# -- limits and overload ----------------------------------------------------------------


def test_a_body_over_the_limit_is_413_by_content_length(http: httpx.Client) -> None:
    r = http.post("/v2/models/identity_fp32/infer", content=b" " * (64 * 1024 + 1))
    assert_error(r, 413, "limit")


def test_a_streamed_body_over_the_limit_is_413_without_content_length(
    http: httpx.Client,
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 8192

    r = http.post("/v2/models/identity_fp32/infer", content=chunks())
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "limit")


def test_a_compressed_body_that_inflates_over_the_limit_is_413(http: httpx.Client) -> None:
    bomb = gzip.compress(b" " * (1024 * 1024))
    assert len(bomb) < 64 * 1024
    r = http.post(
        "/v2/models/identity_fp32/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert_error(r, 413, "decompressed")


def test_a_full_queue_is_503_with_retry_after(http: httpx.Client) -> None:
    r = http.post("/v2/models/busy/infer", json=fp32_request())
    assert_error(r, 503, "queue full")
    assert r.headers["retry-after"] == "2"


def test_a_missed_deadline_is_503(http: httpx.Client) -> None:
    assert_error(http.post("/v2/models/late/infer", json=fp32_request()), 503, "rejected")


def test_a_model_that_is_not_ready_is_503(http: httpx.Client) -> None:
    assert_error(http.post("/v2/models/loading/infer", json=fp32_request()), 503, "loading")


def test_a_backend_failure_is_500(http: httpx.Client) -> None:
    assert_error(http.post("/v2/models/broken/infer", json=fp32_request()), 500, "crashed")


# -- authentication ---------------------------------------------------------------------


def test_protected_endpoints_need_a_token(anon: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v2"),
        ("GET", "/v2/models/identity_fp32"),
        ("GET", "/v2/models/identity_fp32/versions/1"),
        ("GET", "/v2/models/identity_fp32/ready"),
        ("GET", "/v2/models/identity_fp32/versions/1/ready"),
        ("POST", "/v2/models/identity_fp32/infer"),
        ("POST", "/v2/models/identity_fp32/versions/1/infer"),
    ]:
        r = anon.request(method, path, json=fp32_request() if method == "POST" else None)
        assert_error(r, 401, "bearer token")
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_an_invalid_token_is_401(anon: httpx.Client, tokens: Tokens) -> None:
    for value in ("Bearer fgl_wrong", "Basic dXNlcjpwYXNz", "Bearer", tokens.infer):
        r = anon.get("/v2", headers={"Authorization": value})
        assert r.status_code == 401, value
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert tokens.infer not in r.text


def test_scopes_decide_what_a_token_may_do(anon: httpx.Client, tokens: Tokens) -> None:
    infer_only = tokens.header("infer")
    read_only = tokens.header("read")
    admin = tokens.header("admin")
    url = "/v2/models/identity_fp32/infer"

    assert anon.post(url, json=fp32_request(), headers=infer_only).status_code == 200
    r = anon.get("/v2/models/identity_fp32", headers=infer_only)
    assert_error(r, 403, "'read'")
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]

    assert anon.get("/v2/models/identity_fp32", headers=read_only).status_code == 200
    assert anon.get("/v2", headers=read_only).status_code == 200
    assert_error(anon.post(url, json=fp32_request(), headers=read_only), 403, "'infer'")

    assert anon.post(url, json=fp32_request(), headers=admin).status_code == 200
    assert anon.get("/v2/models/identity_fp32/ready", headers=admin).status_code == 200


def test_authentication_comes_before_the_size_limit(anon: httpx.Client) -> None:
    r = anon.post("/v2/models/identity_fp32/infer", content=b" " * (64 * 1024 + 1))
    assert r.status_code == 401


def test_insecure_mode_opens_every_endpoint_and_warns(
    provider: OnnxModelProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fogline.cloud_service._oip_app"):
        app_server = serve(provider, auth=None, insecure_no_auth=True)
        with app_server as srv, httpx.Client(base_url=srv.url) as c:
            assert c.get("/v2").status_code == 200
            assert c.post("/v2/models/identity_fp32/infer", json=fp32_request()).status_code == 200
            assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})
    assert any(
        "AUTHENTICATION IS OFF" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    )


def test_the_app_refuses_to_start_without_tokens_or_an_explicit_insecure_flag(
    provider: OnnxModelProvider, tokens: Tokens
) -> None:
    with pytest.raises(ValueError, match="insecure_no_auth"):
        create_inference_app(provider, auth=None)
    with pytest.raises(ValueError, match="not both"):
        create_inference_app(provider, auth=tokens.store, insecure_no_auth=True)
    with pytest.raises(ValueError, match="max_request_bytes"):
        create_inference_app(provider, auth=tokens.store, max_request_bytes=0)


# -- CORS, metrics, schema ---------------------------------------------------------------


def test_cors_is_off_unless_origins_are_given(
    anon: httpx.Client, provider: OnnxModelProvider, tokens: Tokens
) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = anon.options("/v2/models/identity_fp32/infer", headers=preflight)
    assert "access-control-allow-origin" not in r.headers

    with (
        serve(provider, auth=tokens.store, cors_origins=("https://app.example",)) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        r = c.options("/v2/models/identity_fp32/infer", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options(
            "/v2/models/identity_fp32/infer", headers={**preflight, "Origin": "https://evil"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_requests_are_counted_by_route_template_and_status(
    http: httpx.Client, registry: CollectorRegistry
) -> None:
    def count(route: str, status: str) -> float:
        value = registry.get_sample_value(
            "fogline_http_requests_total", {"route": route, "status": status}
        )
        return value or 0.0

    infer_route = "/v2/models/{model}/infer"
    ok_before, missing_before = count(infer_route, "200"), count(infer_route, "404")
    http.post("/v2/models/identity_fp32/infer", json=fp32_request())
    http.post("/v2/models/identity_int8/infer", json=fp32_request())  # wrong datatype
    http.post("/v2/models/nope/infer", json=fp32_request())
    http.get("/no/such/route")
    assert count(infer_route, "200") == ok_before + 1
    assert count(infer_route, "400") >= 1
    assert count(infer_route, "404") == missing_before + 1
    assert count("unmatched", "404") >= 1
    names = {s.labels.get("route") for m in registry.collect() for s in m.samples}
    assert not any("identity_fp32" in (n or "") for n in names)


def test_the_openapi_schema_declares_every_route_and_the_bearer_scheme(
    anon: httpx.Client,
) -> None:
    schema = anon.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}",
        "/v2/models/{model}/versions/{version}",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/versions/{version}/ready",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    }
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    infer = schema["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "InferenceRequestBody" in schema["components"]["schemas"]
    assert "security" not in schema["paths"]["/v2/health/live"]["get"]
    assert set(get_args(_Datatype)) == set(DATATYPES)


def test_every_cloud_error_maps_to_a_status_code() -> None:
    expected = {
        "UnknownModelError": 404,
        "UnknownBundleError": 400,
        "BundleNotReleasedError": 400,
        "InferenceInputError": 400,
        "ConfigError": 400,
        "CloudDataError": 400,
        "QueueFullError": 503,
        "DeadlineExceededError": 503,
        "ModelNotReadyError": 503,
        "StoreError": 503,
        "StoreCorruptError": 503,
        "BrokerError": 503,
        "BundleSourceError": 503,
        "CloudServiceError": 503,
        "BackendError": 500,
        "CloudError": 503,
    }
    found = {
        name
        for name in errors_module.__all__
        if isinstance(getattr(errors_module, name), type)
        and issubclass(getattr(errors_module, name), CloudError)
    }
    assert found == set(expected), "a new error needs a decided HTTP status"
    for name, status in expected.items():
        cls = getattr(errors_module, name)
        if name == "QueueFullError":
            exc = cls(depth=1, retry_after_ms=10)
        elif name in ("UnknownModelError", "UnknownBundleError", "BundleNotReleasedError"):
            exc = cls("m")
        else:
            exc = cls("x")
        assert http_status_for(exc)[0] == status, name
    assert http_status_for(QueueFullError(depth=1, retry_after_ms=10))[1] == {"Retry-After": "1"}
