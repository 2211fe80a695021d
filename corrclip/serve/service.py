"""One dynamic batch of `corrclip` requests -> pipeline calls -> one response per request.

Triton's dynamic batcher hands over every request that arrived within the queue delay (up to
--max-batch rows). Rows are parsed one by one (a bad row gets its own error and nothing else is
affected), then grouped: rows with the same vocabulary, settings and return_probs run as one
`Segmenter.run` call, so their windows share encoder batches and their vocabulary is embedded
once (the text-embedding cache lives in the segmenter and outlives the batch). Rows with other
vocabularies run as further calls in the same batch. Whatever happens, every row gets a response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np

from ..runtime.image_io import ImageError
from ..runtime.visualize import overlay
from ..vocab import VocabularyError
from .protocol import Job, Limits, RequestError, encode_labels, error_response, parse_row, png_bytes, response

LOG = logging.getLogger("corrclip.serve")


class SegmentService:
    def __init__(self, segmenter, limits: Limits, model_info: dict):
        self.segmenter = segmenter
        self.limits = limits
        self.model_info = model_info  # method, backbone, weights, engine: returned in every `info`

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Triton requests (name -> [rows, 1] array each) -> one dict of [rows, 1] BYTES arrays per request."""
        rows = [{name: value[i] for name, value in request.items()} for request in requests
                for i in range(_rows(request))]
        out = self.rows(rows)
        responses, start = [], 0
        for request in requests:
            n = _rows(request)
            mine = out[start:start + n]
            start += n
            responses.append({name: np.array([[r[name]] for r in mine], dtype=object) for name in out[0]}
                             if mine else {})
        return responses

    def rows(self, rows: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, bytes]]:
        out: list[dict[str, bytes] | None] = [None] * len(rows)
        groups: dict[tuple, list[tuple[int, Job, float]]] = {}
        for k, row in enumerate(rows):
            start = time.perf_counter()
            try:
                job = parse_row(row, self.limits, self.segmenter.settings_for, self.segmenter.needs_masks)
            except RequestError as e:
                out[k] = error_response(str(e))
                continue
            except Exception as e:  # a bug of ours must not take the batch (or the server) down
                LOG.exception("reading a request failed")
                out[k] = error_response(f"internal error while reading the request ({type(e).__name__}); "
                                        "the server log has the details")
                continue
            groups.setdefault(job.group_key(), []).append((k, job, time.perf_counter() - start))
        for members in groups.values():
            for k, message in self._run_group(members, len(rows), len(groups)):
                out[k] = message
        return out

    def _run_group(self, members: list[tuple[int, Job, float]], batch_rows: int, batch_groups: int):
        first = members[0][1]
        try:
            results = self.segmenter.run([job.image for _, job, _ in members], first.vocab, first.settings,
                                         [job.label_map for _, job, _ in members], return_probs=first.return_probs)
        except (ImageError, VocabularyError, ValueError) as e:
            # What the pipeline refuses (e.g. a crop beyond a bundle's largest window) is the request's problem.
            return [(k, error_response(str(e))) for k, _, _ in members]
        except Exception as e:
            LOG.exception("segmenting a batch failed")
            return [(k, error_response(f"internal error while segmenting ({type(e).__name__}: {e}); the server "
                                       "log has the details")) for k, _, _ in members]
        out = []
        for (k, job, decode_seconds), result in zip(members, results, strict=True):
            start = time.perf_counter()
            labels_png = encode_labels(result.labels)
            picture = png_bytes(overlay(job.image, result.labels, result.names)) if job.overlay else b""
            info = {
                # The pipeline times the whole call: every image of this group shares these numbers.
                "stage_seconds": result.timings,
                "request_seconds": {"decode": decode_seconds, "encode": time.perf_counter() - start},
                "batch": {"rows": batch_rows, "groups": batch_groups, "images_in_call": len(members)},
                "settings": asdict(job.settings),
                "model": self.model_info,
            }
            out.append((k, response(labels_png, list(result.names), info, result.probs, picture)))
        return out


def _rows(request: Mapping[str, np.ndarray]) -> int:
    # Triton has already checked that every input of a request has the same batch size.
    return len(next(iter(request.values())))
