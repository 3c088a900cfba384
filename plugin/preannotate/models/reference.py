"""What a user names a model by — ``--model``, ``PREANNOTATE_MODEL``, cvat-cli's ``-p model=str:...`` — and where the
model store is: one grammar and one default, for every command and door.

* a directory holding ``manifest.json``: that artifact;
* ``NAME@VERSION`` (``cars@3``, ``cars@v3``): that version in the store, pinned;
* ``NAME``: the version of ``NAME`` the store serves (the promoted one, else the newest), followed as it changes;
* an architecture (``ssdlite320_mobilenet_v3_large``) not published under its own name: its pretrained weights.

The store is ``--store``, else ``$PREANNOTATE_MODEL_STORE``, else ``/var/lib/preannotate/store``: the volume the
functions mount (at the same path inside them), so the commands on the host and the functions see one store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from preannotate.models.artifact import MANIFEST_FILE, ModelNotFound, ModelStore, split_version
from preannotate.models.registry import ARCHITECTURES

DEFAULT_STORE = "/var/lib/preannotate/store"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_store() -> str:
    return os.environ.get("PREANNOTATE_MODEL_STORE") or DEFAULT_STORE


def open_store(root: str | os.PathLike | None = None, *, create: bool = False) -> ModelStore:
    """The store at ``root`` (default ``default_store()``). Reading a store that is not there is an error (a
    mistyped ``--store`` would otherwise look like an empty store); ``create`` makes it, for commands that
    publish."""
    path = Path(root or default_store())
    if not path.is_dir():
        if not create:
            raise ModelNotFound(f"no model store at {path}: check --store (or PREANNOTATE_MODEL_STORE); "
                                "`preannotate train` and `preannotate models create` make one")
        path.mkdir(parents=True)
    return ModelStore(path)


@dataclass(frozen=True)
class ModelReference:
    text: str
    name: str                        # the store name (for an artifact directory: its directory's name)
    version: int | None = None       # pinned version
    path: Path | None = None         # an artifact directory

    @classmethod
    def parse(cls, text: str) -> ModelReference:
        text = str(text).strip()
        if (Path(text) / MANIFEST_FILE).is_file():
            return cls(text, Path(text).resolve().name, path=Path(text))
        name, version = split_version(text)
        if not _NAME.fullmatch(name) or "/" in text:
            raise ModelNotFound(f"{text!r} is neither a model directory (no {MANIFEST_FILE} there) nor a model "
                                "name (NAME, NAME@VERSION or an architecture)")
        return cls(text, name, version)

    @property
    def architecture(self) -> str | None:
        """The architecture this name is, when it is one (it serves pretrained weights until published)."""
        return self.name if self.path is None and self.name in ARCHITECTURES else None

    def wanted_version(self, store: ModelStore) -> int | None:
        """The version to serve now: pinned, else the store's served one; None when there is none (yet)."""
        if self.path is not None:
            return 0
        return self.version if self.version is not None else store.serving(self.name)

    def directory(self, store: ModelStore) -> Path:
        """The artifact directory this names now; ``ModelNotFound`` says what the store holds instead."""
        if self.path is not None:
            return self.path
        return store.resolve(self.name if self.version is None else f"{self.name}@{self.version}")
