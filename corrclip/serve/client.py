"""A small Python client for `corrclip serve` (and for the exported Triton repository's model).

    from corrclip.serve.client import Client
    with Client("127.0.0.1:8000") as client:
        result = client.segment("photo.jpg", "sky; cloud, road, car")
    result.labels, result.names, result.info["stage_seconds"]

It speaks Triton's HTTP protocol with tritonclient, sending files as binary tensors. One Client
is one connection: use one per thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .protocol import MODEL_NAME, OUTPUTS, decode_labels, encode_labels


class ServeError(RuntimeError):
    """The server refused the request (the message is its error) or could not be reached."""


@dataclass
class Result:
    labels: np.ndarray  # [H, W] int32 class index per pixel
    names: list[str]  # class names, index = label
    info: dict  # stage_seconds, request_seconds, batch, settings, model
    probs: np.ndarray | None = None  # [C, H, W] float16, when asked for
    overlay_png: bytes | None = None  # when asked for


def _read(src: str | os.PathLike | bytes | None) -> bytes | None:
    if src is None or isinstance(src, bytes):
        return src
    with open(src, "rb") as f:
        return f.read()


class Client:
    def __init__(self, url: str = "127.0.0.1:8000", *, timeout: float = 600.0, model: str = MODEL_NAME):
        import tritonclient.http as http

        self._http = http
        self.url = url.removeprefix("http://").rstrip("/")
        self.model = model
        self._client = http.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # refused, reset, timed out: not ready, whatever the transport says
            return False

    def segment(self, image: str | os.PathLike | bytes, classes: str | None = None, *, preset: str | None = None,
                masks: str | os.PathLike | bytes | np.ndarray | None = None, prob_thd: float | None = None,
                return_probs: bool = False, overlay: bool = False) -> Result:
        """Segments one encoded image (a path or the file's bytes) with `classes` (CLI syntax) or a `preset`.
        masks: a region label map (PNG path/bytes, or an integer array at the image's size)."""
        if isinstance(masks, np.ndarray):
            if masks.size and (masks.min() < 0 or masks.max() > 65535):
                # Only the order of region ids matters (the smallest = unsegmented): compact them for 16 bits.
                masks = np.unique(masks, return_inverse=True)[1].reshape(masks.shape)
            masks = encode_labels(masks)
        values = {"image": _read(image), "classes": classes, "preset": preset, "masks": _read(masks),
                  "prob_thd": prob_thd, "return_probs": return_probs or None, "overlay": overlay or None}
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, (bytes, str)):
                t = self._http.InferInput(name, [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[value.encode() if isinstance(value, str) else value]], dtype=object))
            else:
                array = np.array([[value]], dtype=np.float32 if name == "prob_thd" else np.bool_)
                t = self._http.InferInput(name, [1, 1], "FP32" if name == "prob_thd" else "BOOL")
                t.set_data_from_numpy(array)
            inputs.append(t)
        outputs = [self._http.InferRequestedOutput(p.name, binary_data=True) for p in OUTPUTS]
        try:
            reply = self._client.infer(self.model, inputs, outputs=outputs)
        except Exception as e:  # InferenceServerException (queue full, ...) or a transport error
            raise ServeError(_server_message(e)) from None
        return parse_reply({p.name: reply.as_numpy(p.name)[0][0] for p in OUTPUTS})


def parse_reply(out: dict[str, bytes]) -> Result:
    """The model's output tensors (one row) -> Result, or ServeError with the server's message."""
    if out["error"]:
        raise ServeError(bytes(out["error"]).decode())
    probs = None
    if out["probs_npy"]:
        import io

        probs = np.load(io.BytesIO(bytes(out["probs_npy"])), allow_pickle=False)
    return Result(decode_labels(bytes(out["labels_png"])), json.loads(out["names"]), json.loads(out["info"]),
                  probs, bytes(out["overlay_png"]) or None)


def _server_message(e: Exception) -> str:
    message = getattr(e, "message", None)
    text = message() if callable(message) else str(e)
    return text or type(e).__name__
