"""The engine bundle: a folder of graph files and the manifest that describes them.

manifest.json holds the schema version, method, backbone and weights identity, every graph's files
(with sha256), format, precision, input/output names, dtypes and dynamic axes, the preprocessing
constants, the method hyperparameters, the versions that exported it, and the parity report.

Atomicity: an export writes into a sibling temporary folder and renames it into place only after
the manifest is written, so a killed export never leaves a folder that loads as complete. Loading
checks the schema version, the manifest's structure (every field the runtime reads, with its type)
and every file's hash, and says in one line what is wrong.
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
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} is not a JSON object; re-export the bundle")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has bundle schema {version}, this corrclip reads schema {SCHEMA_VERSION}; "
                          "re-export it with this version's corrclip-export")
    check_manifest(manifest, mf)
    for name, graph in manifest["graphs"].items():
        for entry in graph["files"]:
            for rel, digest in entry["sha256"].items():
                f = path / rel
                if not f.is_file():
                    raise BundleError(f"{path}: file {rel} of graph {name} is missing; re-export the bundle")
                if verify_hashes and sha256(f) != digest:
                    raise BundleError(f"{path}: file {rel} of graph {name} is corrupted or was changed "
                                      "(sha256 mismatch); re-export the bundle")
    return Bundle(path, manifest)


# What the loaders and executors read from a manifest, with its JSON type. A manifest that lacks any of
# it fails at load time with one line naming the field, not later with a KeyError deep in the runtime.
_TOP = {"method": str, "backbone": str, "weights": dict, "clip": dict, "window": dict, "graphs": dict}
_CLIP = {"patch": int, "tokenizer": str}
_WINDOW = {"crop": int}
_DYNAMIC_WINDOW = {"multiple": int, "max": int}  # bundles whose graphs take any window size
_SAM = {"img_size": int, "pixel_mean": list, "pixel_std": list}
_GRAPH = {"files": list, "inputs": list, "outputs": list, "precision": str}
_FILE = {"format": str, "file": str, "sha256": dict}
_INPUT = {"name": str, "dtype": str, "shape": list}


def check_manifest(manifest: dict[str, Any], where: str | os.PathLike) -> None:
    """Raises BundleError with one line for the first structural defect of a manifest."""

    def fields(obj: Any, spec: dict[str, type], at: str) -> None:
        if not isinstance(obj, dict):
            raise BundleError(f"{where}: {at} is {_json_type(obj)}, expected an object; re-export the bundle")
        for key, kind in spec.items():
            if key not in obj:
                raise BundleError(f"{where}: {at} has no {key!r}; re-export the bundle")
            if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
                raise BundleError(f"{where}: {at}.{key} is {_json_type(obj[key])}, expected {_json_type(kind())}; "
                                  "re-export the bundle")

    fields(manifest, _TOP, "the manifest")
    fields(manifest["clip"], _CLIP, "clip")
    fields(manifest["window"], _WINDOW, "window")
    if manifest["window"].get("dynamic"):
        fields(manifest["window"], _DYNAMIC_WINDOW, "window")
    if manifest.get("sam") is not None:
        fields(manifest["sam"], _SAM, "sam")
    if not manifest["graphs"]:
        raise BundleError(f"{where}: the manifest lists no graphs; re-export the bundle")
    for name, graph in manifest["graphs"].items():
        at = f"graphs.{name}"
        fields(graph, _GRAPH, at)
        if not graph["files"]:
            raise BundleError(f"{where}: {at} lists no files; re-export the bundle")
        for i, entry in enumerate(graph["files"]):
            fields(entry, _FILE, f"{at}.files[{i}]")
            if entry["file"] not in entry["sha256"]:
                raise BundleError(f"{where}: {at}.files[{i}] has no sha256 for {entry['file']}; re-export the bundle")
        for i, inp in enumerate(graph["inputs"]):
            fields(inp, _INPUT, f"{at}.inputs[{i}]")
        if not all(isinstance(o, str) for o in graph["outputs"]):
            raise BundleError(f"{where}: {at}.outputs must be a list of names; re-export the bundle")


def _json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true/false", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


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
