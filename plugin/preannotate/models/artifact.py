"""Model artifacts (weights + manifest) and the model store that publishes them as numbered versions.

Store layout::

    STORE/<name>/v1/{manifest.json, model.pt}
    STORE/<name>/v2/...
    STORE/<name>/SERVING         the promoted version number (absent: the newest version is served)
    STORE/.staging/<random>/     a version being written; renamed into place in one step when complete

A version directory exists only once complete (``os.rename`` of a directory is atomic), so a reader never sees a
half-written version and a crash while publishing leaves only a stale staging directory behind. A version that is
published but not promoted (say, a retrained model that evaluates worse) is kept and can be promoted later;
promoting an older version is how an operator rolls back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from preannotate.files import write_atomically
from preannotate.shapes import Label, Shape

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_VERSION_DIR = re.compile(r"v(\d+)")
SERVING_FILE = "SERVING"


class ModelNotFound(LookupError):
    pass


def split_version(reference: str) -> tuple[str, int | None]:
    """``NAME@VERSION`` (``cars@3``, ``cars@v3``) → ``("cars", 3)``; ``NAME`` → ``(NAME, None)``; ``ModelNotFound``
    for a version that is not a number. (The rest of the grammar is ``models.reference``.)"""
    name, at, version = reference.partition("@")
    if at and not re.fullmatch(r"v?\d+", version):
        raise ModelNotFound(f"{reference!r}: give the version as NAME@VERSION, e.g. {name}@2")
    return name, int(version.lstrip("v")) if at else None


@dataclass
class Manifest:
    """What a model artifact carries about itself: enough to load it and to know where it came from."""

    architecture: str
    labels: list[Label]
    framework: str = "pytorch"
    name: str = ""
    version: int | None = None
    weights: str = "model.pt"
    input_size: dict[str, Any] = field(default_factory=dict)  # image_size, max_image_size, letterbox
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    score_threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)  # label → its served threshold (training.edits)
    # label → what a mask model serves it as when not a mask (shapes.served_outline: rectangle, rotated-rectangle,
    # ellipse), decided from the shapes it learned from
    outlines: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # pictures of its training run, beside the weights
    attributes: dict[str, Any] = field(default_factory=dict)  # its attribute classifier (models.attributes), if any
    created: str = ""
    runtime: str = ""  # what runs the loaded model's network (``models.runtime``): set when loaded, not published
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "architecture": self.architecture, "framework": self.framework, "weights": self.weights,
            "labels": [label.to_dict() for label in self.labels], "input_size": self.input_size,
            "score_threshold": self.score_threshold, "thresholds": self.thresholds,
            **({"outlines": self.outlines} if self.outlines else {}),
            "hyperparameters": self.hyperparameters,
            "metrics": self.metrics, "provenance": self.provenance, "libraries": self.libraries,
            "report": self.report, "created": self.created, **({"runtime": self.runtime} if self.runtime else {}),
            **({"attributes": self.attributes} if self.attributes else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"manifest format {data['format_version']} is newer than this preannotate "
                             f"understands ({FORMAT_VERSION}); upgrade preannotate")
        return cls(
            architecture=data["architecture"], labels=[Label.from_dict(x) for x in data["labels"]],
            framework=data.get("framework", "pytorch"), name=data.get("name", ""), version=data.get("version"),
            weights=data.get("weights", "model.pt"), input_size=data.get("input_size", {}),
            hyperparameters=data.get("hyperparameters", {}), score_threshold=data.get("score_threshold", 0.5),
            thresholds={str(k): float(v) for k, v in (data.get("thresholds") or {}).items()},
            outlines={str(k): str(v) for k, v in (data.get("outlines") or {}).items()},
            metrics=data.get("metrics", {}), provenance=data.get("provenance", {}),
            libraries=data.get("libraries", {}), report=list(data.get("report") or []),
            created=data.get("created", ""), attributes=dict(data.get("attributes") or {}),
            format_version=data.get("format_version", FORMAT_VERSION))

    def threshold_of(self, label: str) -> float:
        """The score from which shapes of ``label`` are served when no one asks for a threshold: the one chosen on
        the validation frames when publishing (``thresholds``), else ``score_threshold``."""
        return self.thresholds.get(label, self.score_threshold)

    def outline_of(self, label: str) -> str:
        """What a mask model serves ``label`` as (``shapes.OUTLINES``): ``mask`` unless ``outlines`` says."""
        return self.outlines.get(label, "mask")

    def served_thresholds(self) -> dict[str, float]:
        """Every label's served threshold."""
        return {label.name: self.threshold_of(label.name) for label in self.labels}

    def lowest_threshold(self) -> float:
        """The lowest served threshold: what to ask a detector for before ``served`` keeps each label's own."""
        return min(self.served_thresholds().values(), default=self.score_threshold)

    def served(self, shapes: list[Shape]) -> list[Shape]:
        """The shapes scoring at least their label's served threshold (unscored ones always)."""
        return [shape for shape in shapes if shape.score is None or shape.score >= self.threshold_of(shape.label)]

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelNotFound(f"{directory} is not a model artifact (no {MANIFEST_FILE})") from None
        except (KeyError, TypeError, ValueError) as error:
            raise ModelNotFound(f"{path} is not a valid manifest: {error}") from None

    def write(self, directory: Path) -> None:
        written = {key: value for key, value in self.to_dict().items() if key != "runtime"}  # this process's own
        (Path(directory) / MANIFEST_FILE).write_text(json.dumps(written, indent=2) + "\n")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("cvat-preannotate", "torch", "torchvision", "tensorflow", "keras-hub", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    """Published model versions under one directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        found = (_VERSION_DIR.fullmatch(p.name) for p in directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (directory / m.group(0) / MANIFEST_FILE).is_file())

    def path(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version}"

    def latest(self, name: str) -> int | None:
        """The newest version of ``name``, or None when it has none yet."""
        versions = self.versions(name)
        return versions[-1] if versions else None

    def serving(self, name: str) -> int | None:
        """The version of ``name`` to serve: the promoted one, else the newest; None when it has none yet."""
        try:
            promoted = int((self.root / name / SERVING_FILE).read_text().strip())
        except (OSError, ValueError):
            return self.latest(name)
        return promoted if (self.path(name, promoted) / MANIFEST_FILE).is_file() else self.latest(name)

    def promote(self, name: str, version: int) -> None:
        """Serve ``version`` of ``name`` from now on (functions switch on their next request)."""
        if version not in self.versions(name):
            raise ModelNotFound(f"{name} has no version {version} (versions: "
                                f"{', '.join(map(str, self.versions(name))) or 'none'})")
        write_atomically(self.root / name / SERVING_FILE, f"{version}\n")  # readers: the old number or the new

    def resolve(self, reference: str) -> Path:
        """``NAME`` (its serving version) or ``NAME@VERSION`` → the version directory."""
        name, version = split_version(reference)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"no published model named {name!r} in {self.root} (models there: {known})")
        if version is None:
            return self.path(name, self.serving(name))
        if version not in versions:
            raise ModelNotFound(f"{name} has no version {reference.partition('@')[2]!r} (versions: "
                                f"{', '.join(map(str, versions))})")
        return self.path(name, version)

    def publish(self, name: str, write: Callable[[Path], Manifest], promote: bool = True) -> int:
        """Publish a new version of ``name``: ``write(directory)`` fills a staging directory and returns the
        manifest, which gets the name and version stamped in; then the directory is renamed into place.
        With ``promote=False`` the version is kept but the one served so far stays served."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' and '-'")
        staging = self._staging(name)
        try:
            manifest = write(staging)
            (self.root / name).mkdir(parents=True, exist_ok=True)
            version = (self.latest(name) or 0) + 1
            while True:
                manifest.name, manifest.version = name, version
                manifest.created = manifest.created or now_iso()
                manifest.write(staging)
                try:
                    with self._locked(name):
                        serving = self.serving(name)
                        os.rename(staging, self.path(name, version))  # atomic; fails if a racer took the number
                        if promote and (serving is None or version > serving):
                            self.promote(name, version)
                        elif not promote and serving is not None:
                            self.promote(name, serving)  # pin what is served, or "newest" would move to this one
                    return version
                except OSError:
                    if not self.path(name, version).exists():
                        raise
                    version += 1
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _staging(self, name: str) -> Path:
        """A new directory to write a version of ``name`` into, made as ``mkdir`` makes any: readable by others as
        the umask allows (0755 with the usual 022), since a function whose container runs as another user than
        the trainer serves from the same store. (``tempfile.mkdtemp`` would make it 0700.)"""
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        while True:
            staging = staging_root / f"{name}-{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                return staging
            except FileExistsError:  # taken by another publisher: draw again
                continue

    @contextlib.contextmanager
    def _locked(self, name: str):
        """Publishers of one name take turns (across processes) deciding which version is served."""
        with open(self.root / name / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names():
            serving = self.serving(name)
            for version in self.versions(name):
                manifest = Manifest.read(self.path(name, version))
                rows.append({"name": name, "version": version, "architecture": manifest.architecture,
                             "labels": len(manifest.labels), "metrics": manifest.metrics,
                             "created": manifest.created, "serving": version == serving})
        return rows
