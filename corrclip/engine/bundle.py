"""The engine bundle: a folder of graph files and the manifest that describes them.

manifest.json holds the schema version, method, backbone and weights identity, every graph's files
(with sha256), format, precision, input/output names, dtypes and dynamic axes, the preprocessing
constants, the method hyperparameters, the versions that exported it, and the parity report.

Atomicity: an export writes into a sibling temporary folder and renames it into place only after
the manifest is written, so a killed export never leaves a folder that loads as complete. Loading
checks the schema and every file's hash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.checkpoints import sha256

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says what to do."""


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.manifest["graphs"]

    def graph_file(self, name: str, fmt: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"{self.path} has no graph {name!r}; it has {', '.join(self.graphs)}")
        for entry in self.graphs[name]["files"]:
            if entry["format"] == fmt:
                return self.path / entry["file"]
        have = sorted({e["format"] for e in self.graphs[name]["files"]})
        raise BundleError(f"graph {name!r} of {self.path} was not exported as {fmt} (it has {', '.join(have)}); "
                          f"re-export with --format {fmt}")


def load_bundle(path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        hint = " (an unfinished export leaves only a .partial folder)" if path.parent.exists() else ""
        raise BundleError(f"{path} is not an engine bundle: no {MANIFEST}{hint}. Create one with "
                          f"corrclip-export --out {path}")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); re-export the bundle") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has bundle schema {version}, this corrclip reads schema {SCHEMA_VERSION}; "
                          "re-export it with this version's corrclip-export")
    for name, graph in manifest.get("graphs", {}).items():
        for entry in graph["files"]:
            for rel, digest in entry["sha256"].items():
                f = path / rel
                if not f.is_file():
                    raise BundleError(f"{path}: file {rel} of graph {name} is missing; re-export the bundle")
                if verify_hashes and sha256(f) != digest:
                    raise BundleError(f"{path}: file {rel} of graph {name} is corrupted or was changed "
                                      "(sha256 mismatch); re-export the bundle")
    return Bundle(path, manifest)


class BundleWriter:
    """Collects graph files in a temporary folder beside `out`; `commit` publishes it atomically."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} exists; pass --overwrite to replace it or choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))

    def hashes(self, files: list[str]) -> dict[str, str]:
        return {f: sha256(self.tmp / f) for f in files}

    def commit(self, manifest: dict[str, Any]) -> Path:
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
