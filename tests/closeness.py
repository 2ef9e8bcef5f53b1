"""Float comparisons relative to the scale of the expected values (never an absolute tolerance).

A network's outputs may be of size 400 (ResNet-56 with random BatchNorm statistics) or 0.01;
float32 rounding grows with the size of the numbers summed, so an error is judged against the
largest magnitude of the expected tensor, not against a fixed number.
"""

import torch


def assert_close_to_scale(actual, expected, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected| (elementwise against the tensor's scale).

    ``rel`` is the relative error allowed: about 1e-5 for float32 results computed two ways,
    1e-9 to 1e-12 for float64 closed forms.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    common = torch.promote_types(actual.dtype, expected.dtype)
    actual, expected = actual.detach().to(common), expected.detach().to(common)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= rel * scale, (f"max abs difference {error:.3g} exceeds {rel:g} x scale "
                                  f"{scale:.3g} (relative {error / scale if scale else float('inf'):.3g})")
