"""The dtype table agrees with torch and safetensors about every entry."""

import pytest
import torch
from safetensors.torch import load, save

from rlsd_megatron.dtypes import FLOAT_TYPES, bytes_per_element, dtype_name, of_safetensors, of_torch, torch_dtype


@pytest.mark.parametrize("name", sorted(FLOAT_TYPES))
def test_each_name_round_trips_through_torch_and_safetensors(name):
    entry = FLOAT_TYPES[name]
    dtype = torch_dtype(name)
    assert bytes_per_element(name) == dtype.itemsize
    assert str(dtype) == f"torch.{entry.hf_name}"  # HF's torch_dtype spelling is torch's attribute name
    assert of_torch(dtype) is entry and dtype_name(dtype) == name
    # The code a safetensors header really writes for this dtype (bytes 8.. hold the JSON header).
    blob = save({"x": torch.zeros(2, dtype=dtype)})
    assert f'"dtype":"{entry.safetensors_code}"' in blob[8:].decode(errors="ignore")
    assert of_safetensors(entry.safetensors_code) is entry and load(blob)["x"].dtype is dtype


def test_outside_the_table():
    assert of_torch(torch.float64) is None and dtype_name(torch.float64) == "torch.float64"
    assert of_safetensors("F64") is None
    with pytest.raises(ValueError, match="'fp8' is not one of fp32, bf16, fp16"):
        torch_dtype("fp8")
