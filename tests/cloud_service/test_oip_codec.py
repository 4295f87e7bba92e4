"""The Open Inference Protocol codec on its own: bytes in, arrays out, and back.

Responses are read back with ``tritonclient``'s own decoder (``InferResult``) and binary
``BYTES`` tensors compared with its serializer, so the wire format is the official one.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http import InferResult
from tritonclient.utils import serialize_byte_tensor

from fogline.cloud_service._oip import (
    DATATYPES,
    InferenceRequest,
    RequestedOutput,
    datatype_of,
    deserialize_bytes_tensor,
    encode_inference_response,
    model_metadata_json,
    parse_header_length,
    parse_inference_request,
    serialize_bytes_tensor,
    server_metadata_json,
)
from fogline.cloud_service._serving import ModelMetadata, TensorSpec
from fogline.cloud_service.errors import BackendError, InferenceInputError


def meta(
    datatype: str = "FP32",
    shape: tuple[int, ...] = (-1, 3),
    *,
    max_batch_size: int = 8,
    inputs: tuple[str, ...] = ("x",),
    outputs: tuple[str, ...] = ("y",),
) -> ModelMetadata:
    return ModelMetadata(
        name="m",
        version="1",
        platform="onnxruntime_onnx",
        inputs=tuple(TensorSpec(n, datatype, shape) for n in inputs),
        outputs=tuple(TensorSpec(n, datatype, shape) for n in outputs),
        max_batch_size=max_batch_size,
    )


def json_body(**document: Any) -> bytes:
    return json.dumps(document).encode()


def binary_body(
    tensors: list[tuple[str, str, list[int], bytes]], **extra: Any
) -> tuple[bytes, int]:
    """A binary-extension body: the JSON header and the blobs, and the header's length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(blob)},
                }
                for name, datatype, shape, blob in tensors
            ],
            **extra,
        }
    ).encode()
    return header + b"".join(t[3] for t in tensors), len(header)


def wire(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return bytes(serialize_byte_tensor(array).item())
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"v{i}".encode() for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return np.asarray(np.arange(count) % 2 == 0).reshape(shape)
    return np.arange(count).astype(DATATYPES[datatype]).reshape(shape)


def read_back(encoded: Any) -> InferResult:
    return InferResult.from_response_body(encoded.body, header_length=encoded.header_length)


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_json_data_parses_flat_and_nested_for_every_datatype(datatype: str) -> None:
    expected = sample(datatype)
    if datatype == "BYTES":
        nested: Any = [[b.decode() for b in row] for row in expected]
    else:
        nested = expected.tolist()
    flat = [v for row in nested for v in row]
    for data in (nested, flat):
        body = json_body(
            inputs=[{"name": "x", "datatype": datatype, "shape": [2, 3], "data": data}]
        )
        request = parse_inference_request(body, meta(datatype))
        got = request.inputs["x"]
        assert got.dtype == DATATYPES[datatype]
        assert got.shape == (2, 3)
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_binary_data_parses_for_every_datatype(datatype: str) -> None:
    expected = sample(datatype)
    body, length = binary_body([("x", datatype, [2, 3], wire(expected, datatype))])
    request = parse_inference_request(body, meta(datatype), header_length=length)
    got = request.inputs["x"]
    assert got.dtype == DATATYPES[datatype]
    assert np.array_equal(got, expected)


def test_binary_and_json_inputs_mix_in_one_request() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": a.tolist()},
                {
                    "name": "b",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 24},
                },
                {
                    "name": "c",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 24},
                },
            ]
        }
    ).encode()
    body = header + (a + 1).tobytes() + (a + 2).tobytes()
    request = parse_inference_request(body, meta(inputs=("a", "b", "c")), header_length=len(header))
    assert np.array_equal(request.inputs["b"], a + 1)
    assert np.array_equal(request.inputs["c"], a + 2)


def test_bytes_elements_may_be_any_bytes_in_binary_form() -> None:
    elements = np.array([b"\xff\x00", b"", b"x" * 300], dtype=object)
    blob = serialize_bytes_tensor(elements)
    assert blob == bytes(serialize_byte_tensor(elements).item())
    assert list(deserialize_bytes_tensor(blob, 3, "t")) == list(elements)


def test_id_parameters_and_requested_outputs_are_kept() -> None:
    body = json_body(
        id="abc",
        parameters={"binary_data_output": True, "custom": {"k": 1}},
        inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
        outputs=[{"name": "z"}, {"name": "y", "parameters": {"binary_data": False}}],
    )
    request = parse_inference_request(body, meta(outputs=("y", "z")))
    assert request.id == "abc"
    assert request.parameters["custom"] == {"k": 1}
    assert request.binary_output is True
    assert request.outputs == (
        RequestedOutput("z", binary=True, parameters={}),
        RequestedOutput("y", binary=False, parameters={"binary_data": False}),
    )


@pytest.mark.parametrize(
    ("parameters", "timeout_ms"),
    [
        ({}, None),
        ({"timeout_ms": 15}, 15.0),
        ({"timeout": 2500}, 2.5),
        ({"timeout": 0}, None),
        ({"timeout": 50_000, "timeout_ms": 20.5}, 20.5),
    ],
)
def test_timeouts_come_from_timeout_ms_or_tritons_microseconds(
    parameters: dict[str, Any], timeout_ms: float | None
) -> None:
    body = json_body(
        parameters=parameters,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
    )
    assert parse_inference_request(body, meta()).timeout_ms == timeout_ms


def test_a_scalar_input_takes_a_bare_value() -> None:
    body = json_body(inputs=[{"name": "x", "datatype": "INT64", "shape": [], "data": 7}])
    request = parse_inference_request(body, meta("INT64", (), max_batch_size=0))
    assert request.inputs["x"].shape == ()
    assert int(request.inputs["x"]) == 7


def _x(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3], **fields}


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"inputs": [_x(datatype="FP64")]}, "datatype FP64 does not match the model's FP32"),
        ({"inputs": [_x(datatype="BF16")]}, "unsupported datatype 'BF16'"),
        ({"inputs": [_x(shape=[1, 4], data=[1, 2, 3, 4])]}, "shape [1, 4] does not match"),
        ({"inputs": [_x(shape=[3])]}, "shape [3] does not match"),
        ({"inputs": [_x(shape=[1, -3])]}, "negative dimension"),
        ({"inputs": [_x(shape=[1, "3"])]}, "list of integers"),
        ({"inputs": [_x(data=[1, 2])]}, "holds 2 elements"),
        ({"inputs": [_x(data=[1, True, 3])]}, "element 1 is a boolean"),
        ({"inputs": [_x(data=[1, None, 3])]}, "element 1 is null"),
        ({"inputs": [_x(data=[[1, 2], [3, {}]], shape=[1, 4])]}, "shape [1, 4]"),
        ({"inputs": [_x(), _x()]}, "more than once"),
        ({"inputs": [_x(name="q")]}, "unexpected input 'q'"),
        ({"inputs": []}, "needs input(s) 'x'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}]}, "needs 'data'"),
        ({"inputs": [_x(parameters={"binary_data_size": -1})]}, "non-negative"),
        ({"inputs": [_x(parameters={"shared_memory_region": "r"})]}, "shared-memory"),
        ({"inputs": [_x(parameters=[1])]}, "'parameters' of input 'x' must be an object"),
        ({"inputs": [_x(shape=[9, 3], data=[0] * 27)]}, "batch size 9 is outside 1..8"),
        ({"inputs": [_x(shape=[0, 3], data=[])]}, "batch size 0"),
        ({"inputs": [_x()], "outputs": [{"name": "nope"}]}, "unknown requested output 'nope'"),
        ({"inputs": [_x()], "outputs": [{"name": "y"}, {"name": "y"}]}, "more than once"),
        (
            {"inputs": [_x()], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
            "classification",
        ),
        (
            {"inputs": [_x()], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
            "true or false",
        ),
        ({"inputs": [_x()], "outputs": {"name": "y"}}, "'outputs' must be a list"),
        ({"inputs": [_x()], "parameters": {"binary_data_output": "yes"}}, "true or false"),
        ({"inputs": [_x()], "parameters": {"timeout_ms": -5}}, "timeout_ms"),
        ({"inputs": [_x()], "parameters": {"timeout": 1.5}}, "microseconds"),
        ({"inputs": [_x()], "parameters": "fast"}, "must be an object"),
        ({"inputs": [_x()], "id": 12}, "'id' must be a string"),
        ({"inputs": [7]}, "inputs[0] must be an object"),
        ({"inputs": [_x(name=None)]}, "string 'name'"),
        ({"inputs": "x"}, "'inputs' must be a list"),
    ],
)
def test_requests_that_do_not_fit_name_the_problem(document: Any, fragment: str) -> None:
    with pytest.raises(InferenceInputError) as caught:
        parse_inference_request(json_body(**document), meta(outputs=("y",)))
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("UINT8", 256),
        ("UINT8", -1),
        ("INT8", 128),
        ("INT64", 2**63),
        ("UINT64", 2**64),
        ("FP32", 10**400),
    ],
)
def test_integers_out_of_range_are_refused(datatype: str, value: int) -> None:
    body = json_body(inputs=[{"name": "x", "datatype": datatype, "shape": [1, 1], "data": [value]}])
    with pytest.raises(InferenceInputError, match="out of range"):
        parse_inference_request(body, meta(datatype, (-1, 1)))


def test_a_bool_is_not_an_integer_nor_a_number_a_bool() -> None:
    for datatype, data in (("INT32", [True]), ("FP32", [False]), ("BOOL", [1])):
        body = json_body(
            inputs=[{"name": "x", "datatype": datatype, "shape": [1, 1], "data": data}]
        )
        with pytest.raises(InferenceInputError, match="element 0"):
            parse_inference_request(body, meta(datatype, (-1, 1)))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"inputs": [' + b"1" * 5000 + b"]}", "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    ],
)
def test_malformed_json_is_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(InferenceInputError, match=fragment):
        parse_inference_request(raw, meta())


def test_deeply_nested_data_within_the_json_limit_is_flattened_without_recursion() -> None:
    data: Any = [1.0, 2.0, 3.0]
    for _ in range(500):
        data = [data]
    body = json_body(inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": data}])
    assert parse_inference_request(body, meta()).inputs["x"].tolist() == [[1.0, 2.0, 3.0]]


def test_binary_sizes_must_account_for_every_byte() -> None:
    blob = np.zeros((1, 3), np.float32).tobytes()
    body, length = binary_body([("x", "FP32", [1, 3], blob)])
    with pytest.raises(InferenceInputError, match="no input claims"):
        parse_inference_request(body + b"\0", meta(), header_length=length)
    with pytest.raises(InferenceInputError, match="only 8 bytes"):
        parse_inference_request(body[:-4], meta(), header_length=length)
    short, short_len = binary_body([("x", "FP32", [1, 3], blob[:8])])
    with pytest.raises(InferenceInputError, match="needs 12"):
        parse_inference_request(short, meta(), header_length=short_len)
    # Without the header, trailing bytes are just broken JSON.
    with pytest.raises(InferenceInputError, match="not valid JSON"):
        parse_inference_request(json_body(inputs=[_x()]) + b"\0\0", meta(), header_length=None)


def test_binary_data_size_and_data_together_are_refused() -> None:
    body, length = binary_body([("x", "FP32", [1, 3], b"\0" * 12)])
    doc = json.loads(body[:length])
    doc["inputs"][0]["data"] = [1, 2, 3]
    head = json.dumps(doc).encode()
    with pytest.raises(InferenceInputError, match="both 'data' and 'binary_data_size'"):
        parse_inference_request(head + b"\0" * 12, meta(), header_length=len(head))


def test_binary_bool_elements_must_be_0_or_1() -> None:
    body, length = binary_body([("x", "BOOL", [1, 3], b"\x00\x01\x02")])
    with pytest.raises(InferenceInputError, match="0 or 1"):
        parse_inference_request(body, meta("BOOL"), header_length=length)


@pytest.mark.parametrize(
    ("shape", "blob", "fragment"),
    [
        ([1, 1], b"\x05\x00\x00\x00abc", "declares 5 bytes"),
        ([1, 3], b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x01\x00\x00\x00c!", "after the 3"),
        ([1, 3], b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x00\x00", "holds 2 elements"),
        ([1, 3], b"\x00\x00\x00\x00" * 2 + b"\x00\x00", "cannot hold"),
    ],
)
def test_malformed_binary_bytes_tensors_are_refused(
    shape: list[int], blob: bytes, fragment: str
) -> None:
    body, length = binary_body([("x", "BYTES", shape, blob)])
    with pytest.raises(InferenceInputError, match=fragment):
        parse_inference_request(body, meta("BYTES", (-1, -1)), header_length=length)


def test_a_huge_bytes_shape_is_refused_before_allocating() -> None:
    body, length = binary_body([("x", "BYTES", [1, 10**12], b"\0" * 8)])
    with pytest.raises(InferenceInputError, match="cannot hold"):
        parse_inference_request(body, meta("BYTES", (-1, -1)), header_length=length)


def test_inputs_must_agree_on_the_batch_size() -> None:
    body = json_body(
        inputs=[
            {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "b", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6},
        ]
    )
    with pytest.raises(InferenceInputError, match="disagree on the batch size"):
        parse_inference_request(body, meta(inputs=("a", "b")))


def test_models_without_batching_take_any_leading_dimension() -> None:
    body = json_body(inputs=[{"name": "x", "datatype": "FP32", "shape": [20, 3], "data": [0] * 60}])
    request = parse_inference_request(body, meta(max_batch_size=0))
    assert request.inputs["x"].shape == (20, 3)


@pytest.mark.parametrize(
    ("value", "fragment"), [("abc", "non-negative integer"), ("-1", "non-negative"), ("99", "only")]
)
def test_the_header_length_must_be_an_integer_within_the_body(value: str, fragment: str) -> None:
    with pytest.raises(InferenceInputError, match=fragment):
        parse_header_length(value, 10)
    assert parse_header_length(None, 10) is None
    assert parse_header_length(" 7 ", 10) == 7


# -- responses --------------------------------------------------------------------------


def _request(
    outputs: tuple[RequestedOutput, ...] | None = None, *, binary: bool = False
) -> InferenceRequest:
    return InferenceRequest(id="q", inputs={}, outputs=outputs, binary_output=binary)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_responses_decode_with_the_official_client(datatype: str, binary: bool) -> None:
    array = sample(datatype)
    encoded = encode_inference_response(
        model_name="m",
        model_version="3",
        request=_request(binary=binary),
        results={"y": array},
    )
    assert (encoded.header_length is not None) == binary
    result = read_back(encoded)
    got = result.as_numpy("y")
    assert got is not None
    if datatype == "BYTES" and not binary:
        assert [s.encode() for s in got.ravel()] == list(array.ravel())
    else:
        assert got.dtype == array.dtype
        assert np.array_equal(got, array)
    response = result.get_response()
    assert response["model_name"] == "m"
    assert response["model_version"] == "3"
    assert response["id"] == "q"
    assert response["outputs"][0]["datatype"] == datatype


def test_response_lists_requested_outputs_in_their_order_with_mixed_forms() -> None:
    y = np.ones((1, 2), np.float32)
    z = np.zeros((1, 2), np.int64)
    request = _request(
        (RequestedOutput("z", binary=True), RequestedOutput("y", binary=False)), binary=False
    )
    encoded = encode_inference_response(
        model_name="m", model_version="1", request=request, results={"y": y, "z": z}
    )
    assert encoded.media_type == "application/octet-stream"
    head = json.loads(encoded.body[: encoded.header_length])
    assert [o["name"] for o in head["outputs"]] == ["z", "y"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert head["outputs"][1]["data"] == [1.0, 1.0]
    result = read_back(encoded)
    assert np.array_equal(result.as_numpy("z"), z)


def test_response_parameters_are_included_when_given() -> None:
    encoded = encode_inference_response(
        model_name="m",
        model_version="1",
        request=InferenceRequest(id=None, inputs={}, outputs=None),
        results={"y": np.zeros(1, np.float32)},
        parameters={"queue_ms": 1.5},
    )
    document = json.loads(encoded.body)
    assert document["parameters"] == {"queue_ms": 1.5}
    assert "id" not in document
    assert encoded.media_type == "application/json"


def test_str_and_numpy_string_outputs_are_sent_as_bytes() -> None:
    for array in (np.array(["é", "b"], dtype=object), np.array(["é", "b"]), np.array([b"a"])):
        encoded = encode_inference_response(
            model_name="m", model_version="1", request=_request(binary=True), results={"y": array}
        )
        got = read_back(encoded).as_numpy("y")
        assert got is not None
        expected = [v.encode() if isinstance(v, str) else v for v in array.tolist()]
        assert list(got) == expected


def test_non_utf8_bytes_in_json_form_ask_for_binary() -> None:
    with pytest.raises(InferenceInputError, match="binary_data=true"):
        encode_inference_response(
            model_name="m",
            model_version="1",
            request=_request(),
            results={"y": np.array([b"\xff"], dtype=object)},
        )


def test_a_requested_output_the_model_did_not_return_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="no output 'z'"):
        encode_inference_response(
            model_name="m",
            model_version="1",
            request=_request((RequestedOutput("z", binary=False),)),
            results={"y": np.zeros(1)},
        )


def test_dtypes_without_a_protocol_datatype_are_a_backend_error() -> None:
    assert datatype_of(np.zeros(1, np.uint16)) == "UINT16"
    assert datatype_of(np.array(["a"])) == "BYTES"
    with pytest.raises(BackendError, match="complex"):
        datatype_of(np.zeros(1, np.complex64))
    with pytest.raises(BackendError, match="int"):
        serialize_bytes_tensor(np.array([1], dtype=object))


def test_metadata_documents_follow_the_protocol() -> None:
    assert server_metadata_json("s", "1.0", ["binary_tensor_data"]) == {
        "name": "s",
        "version": "1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert model_metadata_json(meta()) == {
        "name": "m",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }


# -- properties ---------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, *, text: bool = False) -> tuple[str, np.ndarray]:
    """A datatype and an array of it, batch axis first; ``text``: BYTES elements are UTF-8
    and floats finite (what JSON can carry)."""
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    count = int(np.prod(shape))
    if datatype == "BYTES":
        elements = st.text(max_size=5).map(str.encode) if text else st.binary(max_size=6)
        array = np.empty(count, dtype=object)
        array[:] = draw(st.lists(elements, min_size=count, max_size=count))
        return datatype, array.reshape(shape)
    dtype = DATATYPES[datatype]
    finite = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    return datatype, draw(hnp.arrays(dtype, shape, elements=finite if text else None))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object or b.dtype == object:
        return list(a.ravel()) == list(b.ravel())
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(tensors())
def test_any_tensor_survives_binary_request_and_response(tensor: tuple[str, np.ndarray]) -> None:
    datatype, array = tensor
    body, length = binary_body([("x", datatype, list(array.shape), wire(array, datatype))])
    spec = meta(datatype, (-1, *array.shape[1:]), max_batch_size=8)
    parsed = parse_inference_request(body, spec, header_length=length).inputs["x"]
    assert parsed.dtype == DATATYPES[datatype]
    assert _same(parsed, array)
    encoded = encode_inference_response(
        model_name="m", model_version="1", request=_request(binary=True), results={"y": parsed}
    )
    back = read_back(encoded).as_numpy("y")
    assert back is not None
    assert _same(back.reshape(array.shape), array)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(tensors(text=True))
def test_any_tensor_survives_json_request_and_response(tensor: tuple[str, np.ndarray]) -> None:
    datatype, array = tensor
    data = [b.decode() for b in array.ravel()] if datatype == "BYTES" else array.tolist()
    body = json_body(
        inputs=[{"name": "x", "datatype": datatype, "shape": list(array.shape), "data": data}]
    )
    spec = meta(datatype, (-1, *array.shape[1:]), max_batch_size=8)
    parsed = parse_inference_request(body, spec).inputs["x"]
    assert _same(parsed, array)
    encoded = encode_inference_response(
        model_name="m", model_version="1", request=_request(), results={"y": parsed}
    )
    back = read_back(encoded).as_numpy("y")
    assert back is not None
    if datatype == "BYTES":
        back = np.array([s.encode() for s in back.ravel()], dtype=object)
    assert _same(back.reshape(array.shape), array)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


_PLAUSIBLE: dict[str, list[Any]] = {
    "datatype": ["FP32", "INT8", "BYTES", "BOOL"],
    "shape": [[1, 3], [2, 3], [], [1, -1]],
    "data": [[1, 2, 3], [[1.5, 2, 3]], ["a", "b", "c"]],
    "parameters": [{"binary_data_size": 12}, {}],
}


@st.composite
def near_valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Request documents with the right input names and any value in any field."""
    tensor: dict[str, Any] = {"name": "x"}
    for key, plausible in _PLAUSIBLE.items():
        if draw(st.booleans()):
            tensor[key] = draw(st.sampled_from(plausible) | _json_values)
    document: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor]]))}
    for key in ("id", "parameters", "outputs"):
        if draw(st.booleans()):
            document[key] = draw(_json_values)
    return document


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(near_valid_documents(), st.binary(max_size=16))
def test_any_request_is_parsed_or_refused_with_an_input_error(
    document: dict[str, Any], tail: bytes
) -> None:
    head = json.dumps(document).encode()
    for spec in (meta("FP32"), meta("BYTES", (-1, -1)), meta("BOOL", (), max_batch_size=0)):
        for body, length in ((head, None), (head + tail, len(head))):
            try:
                request = parse_inference_request(body, spec, header_length=length)
            except InferenceInputError:
                continue
            assert set(request.inputs) == {"x"}


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=64))
def test_arbitrary_bytes_are_refused_with_an_input_error(raw: bytes, split: int) -> None:
    for length in (None, min(split, len(raw))):
        with contextlib.suppress(InferenceInputError):
            parse_inference_request(raw, meta(), header_length=length)


def test_attack_a_bytes_element_with_a_lone_surrogate_is_refused_not_a_crash() -> None:
    # {"data": ["ok", "\ud800", …]}: valid JSON, but "\ud800" read into a str has no UTF-8
    # form; encoding it raised UnicodeEncodeError, which the HTTP API answered 500.
    body = (
        b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 3], '
        b'"data": ["ok", "\\ud800", "\\ud83d\\ude00"]}]}'
    )
    with pytest.raises(InferenceInputError, match="element 1 holds a lone UTF-16 surrogate"):
        parse_inference_request(body, meta("BYTES"))
    # A surrogate pair is one character (U+1F600) and fine.
    paired = body.replace(b'"\\ud800"', b'"\\ud83d\\ude00"')
    parsed = parse_inference_request(paired, meta("BYTES"))
    assert parsed.inputs["x"].tolist() == [[b"ok", "😀".encode(), "😀".encode()]]
