"""llama.cpp's RPC backend (ggml-rpc) through ctypes: serve a device, or use remote ones.

llama-cpp-python has no argument for RPC devices, but a wheel built with `-DGGML_RPC=on`
ships `libggml-rpc` beside libllama. We open the very copies libllama links
(`libggml.so.0`, `libggml-rpc.so.0`, RTLD_GLOBAL): the wheel holds copies, not symlinks, of
each library under several names, and opening `libggml.so` would load a second ggml with
its own backend registry that llama.cpp never looks at (docs/architecture.md, "Split
models").

Importing this module imports `llama_cpp` first (the worker's import order). Only a worker
process or an RPC server process imports it; the agent never does.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from rbee_agent.protocol import ErrorCode, RbeeError

_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"
_DEVICE_TYPE_CPU = 0


def _lib_path(stem: str) -> Path:
    """`libNAME.so.0` on Linux (the name libllama links), else the first copy found."""
    exact = _LIB_DIR / f"lib{stem}.so.0"
    if exact.exists():
        return exact
    found = sorted(_LIB_DIR.glob(f"lib{stem}.*"))
    if not found:
        raise RbeeError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"This llama-cpp-python has no lib{stem} in {_LIB_DIR}: it was built without "
            "llama.cpp's RPC backend",
            hint='Reinstall it with CMAKE_ARGS="-DGGML_RPC=on" (./dev.sh setup does).',
        )
    return found[0]


@dataclass(frozen=True)
class _Libs:
    ggml: ctypes.CDLL
    rpc: ctypes.CDLL


@functools.cache
def _libs() -> _Libs:
    ggml = ctypes.CDLL(str(_lib_path("ggml")), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(_lib_path("ggml-rpc")), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load_all.restype = None
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    ggml.ggml_backend_load_all()
    return _Libs(ggml, rpc)


def device_names() -> list[str]:
    """Every device llama.cpp would place layers on, in its order (RPC devices first)."""
    ggml = _libs().ggml
    return [(ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)) or b"").decode()
            for i in range(ggml.ggml_backend_dev_count())]


def add_servers(endpoints: list[str]) -> None:
    """Register RPC servers (`host:port`) as devices, before the model is loaded.

    llama.cpp connects at once and aborts the process when a server does not answer; the
    agent reads that from the worker's last lines and names the node.
    """
    libs = _libs()
    for endpoint in endpoints:
        reg = libs.rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise RbeeError(ErrorCode.CONNECTION_FAILED,
                            f"llama.cpp could not add the RPC server at {endpoint}")
        libs.ggml.ggml_backend_register(reg)


def serve(endpoint: str, cache_dir: Path | None, threads: int, device: str) -> None:
    """Serve one device on `endpoint` until the process is killed (blocks in C)."""
    ggml = _libs().ggml
    if device == "cpu":
        dev = ggml.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
    else:  # "cuda0" → llama.cpp's device name "CUDA0"
        dev = ggml.ggml_backend_dev_by_name(device.upper().encode())
    if not dev:
        raise RbeeError(ErrorCode.DEVICE_NOT_FOUND,
                        f"llama.cpp has no device {device!r} on this node",
                        hint=f"Devices here: {', '.join(device_names()) or 'none'}.")
    devices = (ctypes.c_void_p * 1)(dev)
    cache = str(cache_dir).encode() if cache_dir is not None else None
    sys.stdout.flush()
    _libs().rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, 1, devices)
