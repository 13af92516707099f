"""Byte sizes of the tensor element types the cost model prices, keyed by torch dtype name.

Names are torch's without the `torch.` prefix ("float32", "bfloat16"); a `torch.dtype` or the string
"torch.float32" is accepted too, so callers can pass what FakeTensor metadata gives them. This table is a
property of the number formats, not of any device, so it may live in code.
"""

_DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPE_BYTES)
"""Every dtype name `dtype_bytes` knows, in table order."""


def normalize_dtype_name(dtype: object) -> str:
    """Return the bare dtype name: `torch.bfloat16` and "torch.bfloat16" both give "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of `dtype` ("float32" -> 4, "bfloat16" -> 2, ...).

    Raises ValueError naming the supported dtypes when the name is unknown (complex and float8 types are not
    priced yet).
    """
    name = normalize_dtype_name(dtype)
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; supported dtypes: {', '.join(SUPPORTED_DTYPES)}"
        ) from None
