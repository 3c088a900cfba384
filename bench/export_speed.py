"""COCO export speed (issue 4): our exporter against Datumaro's (what CVAT's ``COCO 1.0`` export runs).

One synthetic task — 5,000 frames of 1280x720 with 50,000 shapes: rectangles (a quarter of them rotated),
polygons, masks and ellipses — is written to a JSON file in CVAT's encoding. Each exporter then runs in its own
fresh process (so that its peak memory is its own), annotations only, no images:

  ours:     JSON → ``FrameAnnotations`` (untimed), then ``export_dataset(..., "coco", images=None)`` (timed);
  Datumaro: JSON → the ``datumaro`` annotations CVAT 2.42's bindings build (Bbox with the rotation as an
            attribute, Polygon, RleMask from the decoded CVAT mask, ellipses rasterized with OpenCV as CVAT's
            ``EllipsesToMasks`` does) and ``Dataset.from_iterable`` (timed as "build"), then
            ``dataset.export(dir, "coco_instances", save_media=False)`` (timed as "export").

Ratio = Datumaro (build + export) / ours; the target is >= 5. Also given: Datumaro's export step alone over ours,
the peak resident memory of each process (``ru_maxrss``) and what it held before the timed part.

Datumaro is not a dependency of the project: the first run creates ``.venv-bench`` (a plain virtual environment,
``datumaro==1.13.12``), as ``make test`` creates ``.venv``. The table goes to stdout and into the "COCO export
speed (issue 4)" section of bench/RESULTS.md. ``--frames 200`` for a quick correctness run (then nothing is
written unless ``--write``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py (standard library only: the Datumaro worker runs in .venv-bench)

SECTION = "## COCO export speed (issue 4)"
TARGET = 5.0
DATUMARO = "datumaro==1.13.12"
ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".venv-bench"
LABELS = ["car", "person", "road", "sign"]
WIDTH, HEIGHT = 1280, 720
# per 10 shapes: 3 rectangles, 1 rotated rectangle, 3 polygons, 2 masks, 1 ellipse
KINDS = ["rectangle"] * 3 + ["rotated"] + ["polygon"] * 3 + ["mask"] * 2 + ["ellipse"]


# ------------------------------------------------------------------------------------------- synthetic task

def synthetic_task(frames: int, shapes_per_frame: int, seed: int = 0) -> dict:
    """Frames and shapes in CVAT's encoding (plain JSON), deterministic for a seed."""
    import numpy as np
    from preannotate.formats import masks

    rng = np.random.default_rng(seed)
    out = []
    for number in range(frames):
        shapes = []
        for i in range(shapes_per_frame):
            kind = KINDS[(number * shapes_per_frame + i) % len(KINDS)]
            label = LABELS[int(rng.integers(len(LABELS)))]
            w, h = (float(v) for v in rng.uniform(16, 200, 2))
            x, y = float(rng.uniform(0, WIDTH - w)), float(rng.uniform(0, HEIGHT - h))
            shape = {"label": label, "type": kind, "rotation": 0.0, "attributes": {"color": "red"},
                     "occluded": bool(rng.random() < 0.1)}
            if kind in ("rectangle", "rotated"):
                shape.update(type="rectangle", points=[round(v, 2) for v in (x, y, x + w, y + h)],
                             rotation=round(float(rng.uniform(1, 359)), 1) if kind == "rotated" else 0.0)
            elif kind == "polygon":
                count = int(rng.integers(5, 24))
                angles = np.sort(rng.uniform(0, 2 * math.pi, count))
                radius = rng.uniform(0.5, 1.0, count)
                xs = x + w / 2 + radius * w / 2 * np.cos(angles)
                ys = y + h / 2 + radius * h / 2 * np.sin(angles)
                shape["points"] = [round(float(v), 2) for v in np.stack([xs, ys], 1).ravel()]
            elif kind == "mask":  # a blob with a wavy outline, as if painted with a brush
                bw, bh, left, top = int(w), int(h), int(x), int(y)
                yy, xx = np.mgrid[0:bh, 0:bw]
                u, v = (xx - bw / 2) / (bw / 2), (yy - bh / 2) / (bh / 2)
                waves, phase = int(rng.integers(2, 7)), float(rng.uniform(0, 2 * math.pi))
                blob = np.hypot(u, v) < 0.8 + 0.15 * np.sin(waves * np.arctan2(v, u) + phase)
                *runs, x1, y1, x2, y2 = masks.bitmap_to_cvat_rle(blob)  # over the blob's own tight box
                shape["points"] = [*runs, x1 + left, y1 + top, x2 + left, y2 + top]
            else:
                cx, cy = x + w / 2, y + h / 2
                shape.update(points=[round(v, 2) for v in (cx, cy, cx + w / 2, cy - h / 2)],
                             rotation=round(float(rng.uniform(0, 90)), 1))
            shapes.append(shape)
        out.append({"frame": number, "width": WIDTH, "height": HEIGHT, "name": f"images/{number:06d}.jpg",
                    "shapes": shapes})
    return {"labels": LABELS, "frames": out}


# ---------------------------------------------------------------------------------------------------- workers

def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker_ours(data_path: Path, out: Path) -> dict:
    from preannotate.formats.dataset import export_dataset
    from preannotate.shapes import FrameAnnotations, Shape, parse_label_list

    data = json.loads(data_path.read_text())
    labels = parse_label_list(",".join(data["labels"]))
    items = [(f["frame"], FrameAnnotations(f["frame"], f["width"], f["height"], f["name"],
                                           [Shape(frame=f["frame"], **s) for s in f["shapes"]]))
             for f in data["frames"]]
    del data
    before = peak_mb()
    started = time.perf_counter()
    summary = export_dataset(out, "coco", labels, items, progress=False)
    elapsed = time.perf_counter() - started
    return {"export_s": elapsed, "total_s": elapsed, "rss_before_mb": before, "peak_mb": peak_mb(),
            "annotations": summary.objects["train"], "file": str(out / "annotations/instances_train.json")}


def worker_datumaro(data_path: Path, out: Path) -> dict:
    import cv2
    import datumaro as dm
    import numpy as np
    from pycocotools import mask as mask_utils

    data = json.loads(data_path.read_text())
    label_index = {name: i for i, name in enumerate(data["labels"])}

    def cvat_rle_to_dm(points, height, width):  # CVAT's MaskConverter.cvat_rle_to_dm_rle
        *runs, left, top, right, bottom = (int(p) for p in points)
        values = np.repeat((np.arange(len(runs)) % 2).astype(np.uint8), runs)
        full = np.zeros((height, width), dtype=np.uint8)
        full[top:bottom + 1, left:right + 1] = values.reshape(bottom - top + 1, right - left + 1)
        return mask_utils.encode(np.asfortranarray(full))

    def ellipse_to_dm(points, rotation, height, width):  # CVAT's EllipsesToMasks.convert_ellipse
        cx, cy, right, top = points
        mat = np.zeros((height, width), dtype=np.uint8)
        cv2.ellipse(mat, (round(cx), round(cy)), (round(right - cx), round(cy - top)), rotation, 0, 360, 255,
                    thickness=-1)
        return mask_utils.encode(np.asfortranarray(mat))

    def annotation(shape, height, width):
        common = {"label": label_index[shape["label"]],
                  "attributes": {**shape["attributes"], "occluded": shape["occluded"], "rotation": shape["rotation"]}}
        kind, points = shape["type"], shape["points"]
        if kind == "rectangle":
            return dm.Bbox(points[0], points[1], points[2] - points[0], points[3] - points[1], **common)
        if kind == "polygon":
            return dm.Polygon(points, **common)
        if kind == "mask":
            return dm.RleMask(rle=cvat_rle_to_dm(points, height, width), **common)
        return dm.RleMask(rle=ellipse_to_dm(points, shape["rotation"], height, width), **common)

    before = peak_mb()
    started = time.perf_counter()
    items = [dm.DatasetItem(id=Path(f["name"]).with_suffix("").as_posix(), subset="default",
                            media=dm.Image.from_file(path=f["name"], size=(f["height"], f["width"])),
                            annotations=[annotation(s, f["height"], f["width"]) for s in f["shapes"]],
                            attributes={"frame": f["frame"]})
             for f in data["frames"]]
    dataset = dm.Dataset.from_iterable(items, categories=data["labels"])
    built = time.perf_counter()
    dataset.export(str(out), "coco_instances", save_media=False)
    done = time.perf_counter()
    file = out / "annotations/instances_default.json"
    return {"build_s": built - started, "export_s": done - built, "total_s": done - started,
            "rss_before_mb": before, "peak_mb": peak_mb(),
            "annotations": len(json.loads(file.read_text())["annotations"]), "file": str(file)}


# ------------------------------------------------------------------------------------------------------- main

def ensure_bench_venv() -> Path:
    """``.venv-bench`` with Datumaro, created on first use (a plain venv: Datumaro pins its own numpy etc.)."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / f".installed-{DATUMARO}"
    if not stamp.exists():
        print(f"setting up {BENCH_VENV} with {DATUMARO} (once)", file=sys.stderr)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", DATUMARO], check=True)
        stamp.touch()
    return python


def run_worker(python: Path, kind: str, data: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(python), __file__, "--worker", kind, str(data), str(out)], check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(ours_file: str, theirs_file: str) -> str:
    """A cross-check of the two outputs: same images, annotations per category, boxes of plain rectangles."""
    import numpy as np

    ours, theirs = json.loads(Path(ours_file).read_text()), json.loads(Path(theirs_file).read_text())
    assert len(ours["images"]) == len(theirs["images"]), "image counts differ"
    count = {}
    for name, dataset in (("ours", ours), ("datumaro", theirs)):
        count[name] = sorted((c, sum(a["category_id"] == c for a in dataset["annotations"]))
                             for c in range(1, len(LABELS) + 1))
    assert count["ours"] == count["datumaro"], count

    def plain_boxes(dataset):
        return np.array(sorted((a["image_id"], *a["bbox"]) for a in dataset["annotations"]
                               if not a["segmentation"] and not a["attributes"].get("rotation")))

    assert np.allclose(plain_boxes(ours), plain_boxes(theirs), atol=1e-6), "rectangle boxes differ"
    return f"{len(ours['images'])} images, {len(ours['annotations'])} annotations in both, rectangle boxes equal"


def section(args, info, ours, theirs, check: str, datumaro_version: str) -> str:
    ratio, export_ratio = theirs["total_s"] / ours["total_s"], theirs["export_s"] / ours["total_s"]
    verdict = "pass" if ratio >= TARGET else "FAIL"
    return "\n".join([
        SECTION, "",
        "Command: `.venv/bin/python bench/export_speed.py` (creates `.venv-bench` with Datumaro on first use).", "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, Datumaro {datumaro_version}; "
        f"run {info['date']}.", "",
        f"Task: {args.frames} frames of {WIDTH}x{HEIGHT}, {args.frames * args.shapes} shapes (per 10: 3 "
        "rectangles, 1 rotated rectangle, 3 polygons, 2 masks, 1 ellipse), annotations only. Each exporter in its "
        "own process; *ours*: `export_dataset(..., \"coco\")` from `FrameAnnotations`; *Datumaro*: the annotations "
        "CVAT's bindings build (masks decoded, ellipses rasterized) + `Dataset.from_iterable` (build), then "
        "`export(..., \"coco_instances\", save_media=False)`. Peak = `ru_maxrss` of the process; before = what it "
        "held when the timed part began (data loaded).", "",
        "| exporter | build s | export s | total s | peak MB | before MB |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours | – | {ours['export_s']:.2f} | {ours['total_s']:.2f} | {ours['peak_mb']:.0f} | "
        f"{ours['rss_before_mb']:.0f} |",
        f"| Datumaro | {theirs['build_s']:.2f} | {theirs['export_s']:.2f} | {theirs['total_s']:.2f} | "
        f"{theirs['peak_mb']:.0f} | {theirs['rss_before_mb']:.0f} |", "",
        f"Ratio Datumaro total / ours: **{ratio:.1f}x** (target >= {TARGET:.0f}x: {verdict}); Datumaro's export "
        f"step alone / ours: {export_ratio:.1f}x.", "",
        f"Cross-check: {check}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--shapes", type=int, default=10, help="shapes per frame")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md even for a small run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the ratio is under {TARGET}")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, data, out = args.worker
        result = (worker_ours if kind == "ours" else worker_datumaro)(Path(data), Path(out))
        print(json.dumps(result))
        return 0

    bench_python = ensure_bench_venv()
    datumaro_version = subprocess.run([str(bench_python), "-c", "import datumaro; print(datumaro.__version__)"],
                                      check=True, capture_output=True, text=True).stdout.strip()
    info = _results.machine()
    with tempfile.TemporaryDirectory(prefix="preannotate-export-bench-") as tmp:
        data = Path(tmp) / "task.json"
        started = time.perf_counter()
        data.write_text(json.dumps(synthetic_task(args.frames, args.shapes)))
        print(f"synthetic task: {args.frames} frames, {args.frames * args.shapes} shapes "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        ours = run_worker(Path(sys.executable), "ours", data, Path(tmp) / "ours")
        print(f"ours: {ours['total_s']:.2f} s, peak {ours['peak_mb']:.0f} MB", file=sys.stderr)
        theirs = run_worker(bench_python, "datumaro", data, Path(tmp) / "datumaro")
        print(f"datumaro: {theirs['build_s']:.2f} + {theirs['export_s']:.2f} s, peak {theirs['peak_mb']:.0f} MB",
              file=sys.stderr)
        check = compare(ours["file"], theirs["file"])
    text = section(args, info, ours, theirs, check, datumaro_version)
    _results.publish(SECTION, text, write=not args.no_write and (args.write or args.frames >= 5000))
    return 1 if args.check and theirs["total_s"] / ours["total_s"] < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
