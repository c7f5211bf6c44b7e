"""Loads the compiled extension dynconv_ext._C and checks it matches the running torch."""
import torch

_LOAD_ERROR = None

try:
    from . import _C  # noqa: F401  (registers the dynconv:: operators)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _LOAD_ERROR = exc


def _torch_release(version: str) -> str:
    return version.split("+")[0]


def load_error():
    """The ImportError raised while loading dynconv_ext._C, or None if it loaded."""
    return _LOAD_ERROR


def build_info() -> dict:
    """What the extension was built with: {'torch': ..., 'cpu_kernel': ..., 'cuda': bool}.

    ``cpu_kernel`` is the float32 kernel in use now: ``avx512f`` (AVX-512 blocks for outputs wider than 16
    channels, AVX2 below), ``avx2_fma`` or ``generic``. It is asked afresh on every call, because
    ``DYNCONV_EXT_AVX512=0`` (read by the kernels on every call) turns the AVX-512 blocks off.
    """
    require_extension()
    fields = dict(item.split("=", 1) for item in torch.ops.dynconv.build_info().split(";"))
    fields["cuda"] = fields.get("cuda") == "1"
    return fields


def require_extension():
    """Raises a RuntimeError that says how to fix a missing or mismatched build."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "dynconv_ext._C could not be loaded; build it with `pip install .` (or "
            "`pip install --no-build-isolation .` where torch is preinstalled). If it was built against "
            f"another torch than the running {torch.__version__}, rebuild it. Original error: {_LOAD_ERROR}"
        ) from _LOAD_ERROR


def check_torch_version():
    built = build_info()["torch"]
    running = _torch_release(torch.__version__)
    if built != running:
        raise RuntimeError(
            f"dynconv_ext._C was built against torch {built} but torch {running} is running; rebuild "
            "with `pip install --no-build-isolation .`"
        )


if _LOAD_ERROR is None:
    check_torch_version()
