"""HPSClient (sync) and AsyncHPSClient over tritonclient's HTTP or gRPC protocol."""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("http", "grpc")
_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


def _module(protocol: str, aio: bool):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    if protocol == "http":
        if aio:
            import tritonclient.http.aio as m
        else:
            import tritonclient.http as m
    elif aio:
        import tritonclient.grpc.aio as m
    else:
        import tritonclient.grpc as m
    return m


def _inputs(m, named: dict[str, np.ndarray]) -> list:
    out = []
    for name, a in named.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {a.dtype}; send float32, int64 or int32")
        t = m.InferInput(name, list(a.shape), _DTYPES[a.dtype])
        t.set_data_from_numpy(a)
        out.append(t)
    return out


class _Requests:
    """The request tensors of each model kind (shared by the sync and async clients)."""

    @staticmethod
    def predict(dense: np.ndarray, cat: np.ndarray) -> dict[str, np.ndarray]:
        return {"DENSE": np.asarray(dense, np.float32), "CAT": np.asarray(cat, np.int64)}

    @staticmethod
    def embed(cat: np.ndarray) -> dict[str, np.ndarray]:
        return {"CAT": np.asarray(cat, np.int64)}

    @staticmethod
    def lookup(keys: np.ndarray, num_keys: np.ndarray) -> dict[str, np.ndarray]:
        # HugeCTR's layout: one row of keys and one row of counts per request
        k, n = np.asarray(keys, np.int64), np.asarray(num_keys, np.int32)
        return {"KEYS": k.reshape(1, -1), "NUMKEYS": n.reshape(1, -1)}


class HPSClient:
    """Sync client: ``predict`` (ensemble), ``embed`` (slots model), ``lookup`` (HPS I/O)."""

    def __init__(self, url: str, protocol: str = "http", **kwargs):
        self.protocol = protocol
        self.m = _module(protocol, aio=False)
        self.client = self.m.InferenceServerClient(url, **kwargs)

    def infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        r = self.client.infer(
            model, _inputs(self.m, inputs), outputs=[self.m.InferRequestedOutput(output)]
        )
        return r.as_numpy(output)

    def predict(self, dense, cat, model: str = "dlrm") -> np.ndarray:
        """PROB float32 [B, 1] from DENSE [B, 13] and CAT [B, 26]."""
        return self.infer(model, _Requests.predict(dense, cat), "PROB")

    def embed(self, cat, model: str = "dlrm_embedding") -> np.ndarray:
        """EMB float32 [B, slots * dim] from CAT [B, slots]."""
        return self.infer(model, _Requests.embed(cat), "EMB")

    def lookup(self, keys, num_keys, model: str = "hps_embedding") -> np.ndarray:
        """OUTPUT0 float32 [1, n x dim] from KEYS (all tables concatenated) and NUMKEYS (per
        table), flattened."""
        return self.infer(model, _Requests.lookup(keys, num_keys), "OUTPUT0").reshape(-1)

    def load_model(self, name: str) -> None:
        self.client.load_model(name)

    def unload_model(self, name: str) -> None:
        self.client.unload_model(name)

    def is_model_ready(self, name: str) -> bool:
        return self.client.is_model_ready(name)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HPSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHPSClient:
    """asyncio client with the same verbs as HPSClient (``await client.predict(...)``)."""

    def __init__(self, url: str, protocol: str = "http", **kwargs):
        self.protocol = protocol
        self.m = _module(protocol, aio=True)
        self.client = self.m.InferenceServerClient(url, **kwargs)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        outs = [self.m.InferRequestedOutput(output)]
        r = await self.client.infer(model, _inputs(self.m, inputs), outputs=outs)
        return r.as_numpy(output)

    async def predict(self, dense, cat, model: str = "dlrm") -> np.ndarray:
        return await self.infer(model, _Requests.predict(dense, cat), "PROB")

    async def embed(self, cat, model: str = "dlrm_embedding") -> np.ndarray:
        return await self.infer(model, _Requests.embed(cat), "EMB")

    async def lookup(self, keys, num_keys, model: str = "hps_embedding") -> np.ndarray:
        out = await self.infer(model, _Requests.lookup(keys, num_keys), "OUTPUT0")
        return out.reshape(-1)  # [1, n x dim], flattened as HPSClient.lookup

    async def close(self) -> None:
        await self.client.close()
