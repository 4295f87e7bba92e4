"""The official Triton HTTP client, unchanged, against the inference API on a real server.

``tritonclient.http.InferenceServerClient`` speaks the Open Inference Protocol with the
binary tensor data extension; if it works here, Triton and KServe users' code works.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fogline import __version__
from tests.cloud_service.test_app import ServerThread
from tests.cloud_service.test_oip_app import (
    OnnxModelProvider,
    Tokens,
    make_provider,
    make_tokens,
    serve,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return make_tokens()


@pytest.fixture(scope="module")
def provider() -> OnnxModelProvider:
    return make_provider()


@pytest.fixture(scope="module")
def server(provider: OnnxModelProvider, tokens: Tokens) -> Iterator[ServerThread]:
    with serve(provider, auth=tokens.store) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=10.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def auth(tokens: Tokens) -> dict[str, str]:
    return tokens.header("both")


def _array(datatype: str, rows: int = 2) -> np.ndarray:
    rng = np.random.default_rng(11)
    if datatype == "BYTES":
        return np.array(
            [[f"r{r}c{c}-é".encode() for c in range(3)] for r in range(rows)], dtype=object
        )
    if datatype == "BOOL":
        return rng.integers(0, 2, (rows, 3)).astype(bool)
    dtype = {
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }[datatype]
    return (rng.integers(0, 100, (rows, 3)) * (1 if np.dtype(dtype).kind != "f" else 0.5)).astype(
        dtype
    )


def test_client_sees_the_server_live_and_ready(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("identity_fp32", headers=auth)
    assert client.is_model_ready("sum_product", "1", headers=auth)
    assert not client.is_model_ready("loading", headers=auth)


def test_client_reads_server_and_model_metadata(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    server = client.get_server_metadata(headers=auth)
    assert server["version"] == __version__
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("sum_product", headers=auth)
    assert meta["versions"] == ["1", "2"]
    assert [i["name"] for i in meta["inputs"]] == ["a", "b"]
    assert meta["inputs"][0] == {"name": "a", "datatype": "FP32", "shape": [-1, 4]}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(
    "datatype",
    ["BOOL", "UINT8", "UINT64", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"],
)
def test_client_infers_every_datatype_as_json_and_binary(
    client: httpclient.InferenceServerClient, auth: dict[str, str], datatype: str, binary: bool
) -> None:
    array = _array(datatype)
    x = httpclient.InferInput("x", list(array.shape), datatype)
    x.set_data_from_numpy(array, binary_data=binary)
    y = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer(
        f"identity_{datatype.lower()}", [x], outputs=[y], request_id="r-1", headers=auth
    )
    got = result.as_numpy("y")
    assert got is not None
    assert got.shape == array.shape
    if datatype == "BYTES":
        # JSON answers carry text; the client gives those back as str-typed elements.
        assert [bytes(v) if isinstance(v, bytes) else v.encode() for v in got.ravel()] == list(
            array.ravel()
        )
    else:
        assert got.dtype == array.dtype
        assert np.array_equal(got, array)
    response = result.get_response()
    assert response["id"] == "r-1"
    assert response["model_version"] == "1"


def test_client_without_requested_outputs_gets_all_of_them_in_binary(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 3.0, dtype=np.float32)
    inputs = []
    for name, value, as_binary in (("a", a, True), ("b", b, False)):
        tensor = httpclient.InferInput(name, [2, 4], "FP32")
        tensor.set_data_from_numpy(value, binary_data=as_binary)
        inputs.append(tensor)
    result = client.infer("sum_product", inputs, model_version="1", headers=auth)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("product"), a * b)
    outputs = result.get_response()["outputs"]
    assert all("binary_data_size" in o["parameters"] for o in outputs)


def test_client_asks_for_one_output_in_json_and_one_in_binary(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    a = np.ones((1, 4), dtype=np.float32)
    inputs = []
    for name in ("a", "b"):
        tensor = httpclient.InferInput(name, [1, 4], "FP32")
        tensor.set_data_from_numpy(a)
        inputs.append(tensor)
    outputs = [
        httpclient.InferRequestedOutput("product", binary_data=False),
        httpclient.InferRequestedOutput("sum", binary_data=True),
    ]
    result = client.infer("sum_product", inputs, outputs=outputs, headers=auth)
    np.testing.assert_array_equal(result.as_numpy("sum"), np.full((1, 4), 102.0, np.float32))
    np.testing.assert_array_equal(result.as_numpy("product"), a)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["product", "sum"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_client_request_compression_is_understood(
    client: httpclient.InferenceServerClient, auth: dict[str, str], algorithm: str
) -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = httpclient.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(array)
    result = client.infer(
        "identity_fp32", [x], headers=auth, request_compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(result.as_numpy("y"), array)


def test_client_timeout_parameter_reaches_the_model(
    client: httpclient.InferenceServerClient, auth: dict[str, str], provider: OnnxModelProvider
) -> None:
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3), np.float32))
    before = len(provider.calls)
    client.infer("identity_fp32", [x], headers=auth, timeout=25_000)
    assert provider.calls[before].timeout_ms == 25.0


@pytest.mark.parametrize(
    ("call", "status", "fragment"),
    [
        (lambda c, h: c.get_model_metadata("nope", headers=h), "404", "nope"),
        (lambda c, h: c.get_model_metadata("sum_product", "9", headers=h), "404", "'9'"),
        (lambda c, h: c.get_server_metadata(), "401", "bearer token"),
    ],
)
def test_client_errors_carry_status_and_message(
    client: httpclient.InferenceServerClient,
    auth: dict[str, str],
    call: Any,
    status: str,
    fragment: str,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client, auth)
    assert caught.value.status() == status
    assert fragment in caught.value.message()


def test_client_infer_with_a_wrong_shape_reports_400(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    x = httpclient.InferInput("x", [1, 5], "FP32")
    x.set_data_from_numpy(np.zeros((1, 5), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("identity_fp32", [x], headers=auth)
    assert caught.value.status() == "400"
    assert "shape [1, 5]" in caught.value.message()


def test_client_sees_queue_full_as_503(
    client: httpclient.InferenceServerClient, auth: dict[str, str]
) -> None:
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("busy", [x], headers=auth)
    assert caught.value.status() == "503"
    assert "queue full" in caught.value.message()
