"""The ``preannotate`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from preannotate.serving.core import DEFAULT_STORE


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=os.environ.get("PREANNOTATE_MODEL_STORE", DEFAULT_STORE),
                        help="model store directory (env PREANNOTATE_MODEL_STORE; default %(default)s)")


def _cvat_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("CVAT server (credentials only from the environment, so they stay out of "
                                      "shell history: CVAT_USERNAME + CVAT_PASSWORD, or CVAT_ACCESS_TOKEN)")
    group.add_argument("--cvat-url", default=os.environ.get("CVAT_URL"), help="e.g. http://localhost:8080 "
                                                                               "(env CVAT_URL)")
    group.add_argument("--org", default=os.environ.get("CVAT_ORG"), help="organization slug (env CVAT_ORG)")
    group.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")


def _connect(args: argparse.Namespace):
    from preannotate.cvat.client import connect

    return connect(args.cvat_url, organization=args.org, verify_tls=not args.insecure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preannotate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list, show and create model versions in the store")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="published models and their versions")
    _store_argument(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = models_commands.add_parser("show", help="the manifest of NAME[@VERSION] or of an artifact directory")
    _store_argument(show)
    show.add_argument("model")
    promote = models_commands.add_parser(
        "promote", help="serve NAME@VERSION from now on (roll back or forward); functions switch on their next call")
    _store_argument(promote)
    promote.add_argument("model", help="NAME@VERSION")
    architectures = models_commands.add_parser("architectures", help="the architectures of the registry")
    architectures.add_argument("--json", action="store_true", help="print JSON")
    create = models_commands.add_parser(
        "create", help="publish an untrained or pretrained version of an architecture (what an image build does)")
    _store_argument(create)
    create.add_argument("architecture")
    create.add_argument("--labels", help="comma-separated label names, optionally name:type "
                                         "(default with --init pretrained: the COCO labels)")
    create.add_argument("--name", help="model name in the store (default: the architecture)")
    create.add_argument("--init", choices=("random", "pretrained"), default="random")
    create.add_argument("-H", "--hyperparameters", default="", help='e.g. "image-size=512; score-threshold=0.4"')

    functions = commands.add_parser("functions", help="render and check the Nuclio functions")
    functions_commands = functions.add_subparsers(dest="functions_command", required=True)
    render = functions_commands.add_parser("render", help="write functions/ from the model registry")
    render.add_argument("--out", default="functions", help="directory (default %(default)s)")
    validate = functions_commands.add_parser("validate", help="check function directories against CVAT's rules")
    validate.add_argument("directories", nargs="*", default=["functions"],
                          help="function directories, or roots searched for function.yaml (default functions)")

    export = commands.add_parser("export", help="a CVAT task, job or project as a COCO or TFRecord training folder")
    _cvat_arguments(export)
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", type=int)
    source.add_argument("--job", type=int)
    source.add_argument("--project", type=int)
    export.add_argument("--format", choices=("coco", "tfrecord"), default="coco")
    export.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    export.add_argument("--val-fraction", type=float, default=0.0, help="share of frames in the val split")
    export.add_argument("--seed", type=int, default=0, help="the split's seed (same seed, same split)")
    export.add_argument("--quality", choices=("original", "compressed"), default="original")

    importer = commands.add_parser("import", help="predictions from a file into a task, as auto shapes (re-running "
                                                  "replaces them, never duplicates)")
    _cvat_arguments(importer)
    importer.add_argument("--task", type=int, required=True)
    importer.add_argument("file", help="COCO results (a list of detections) or a COCO dataset")
    importer.add_argument("--format", choices=("coco-results", "coco"), default="coco-results")
    importer.add_argument("--coco-file", help="coco-results: the COCO dataset they refer to (default: our export's "
                                              "convention, image id = frame + 1, categories in CVAT label order)")
    importer.add_argument("--threshold", type=float, help="keep detections scoring at least this")
    importer.add_argument("--label-map", help="renames, e.g. 'automobile=car,human=person'")
    importer.add_argument("--replace", action="store_true", help="replace every shape of those frames, manual too")

    annotate = commands.add_parser("annotate", help="pre-annotate a task or project with a model or a deployed "
                                                    "function")
    _cvat_arguments(annotate)
    _store_argument(annotate)
    target = annotate.add_mutually_exclusive_group(required=True)
    target.add_argument("--task", type=int)
    target.add_argument("--project", type=int)
    model = annotate.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="NAME[@VERSION] in the store, an architecture, or an artifact directory")
    model.add_argument("--function-url", help="a deployed detector function, e.g. http://localhost:32001")
    annotate.add_argument("--threshold", type=float, help="minimum score (default: the model's)")
    annotate.add_argument("--frames", help="a range of frames, e.g. 0-99 (default: all)")
    annotate.add_argument("--only-unannotated", action="store_true", help="skip frames someone annotated")
    annotate.add_argument("--batch-size", type=int, default=4, help="frames per forward pass (GPU: 8-16)")
    annotate.add_argument("--upload-every", type=int, default=200, help="frames per upload (finished work is kept)")
    annotate.add_argument("--label-map", help="model=task label renames, e.g. 'automobile=car'")
    annotate.add_argument("--device", help="cpu, cuda (default: cuda when available)")

    train = commands.add_parser("train", help="train a model from CVAT tasks or an exported folder and publish it")
    _cvat_arguments(train)
    _store_argument(train)
    train.add_argument("--task", type=int, action="append", default=[], help="a CVAT task (repeatable)")
    train.add_argument("--project", type=int, help="every task of a CVAT project")
    train.add_argument("--data", help="an export folder (COCO or TFRecord); a 'val' split there is the validation "
                                      "set")
    train.add_argument("--model", required=True, help="the architecture (preannotate models architectures)")
    train.add_argument("-H", "--hyperparameters", default="", help='e.g. "num-steps=2000; batch-size=8" '
                                                                    "(key=value lines or ;/, lists)")
    train.add_argument("--from-model", help="fine-tune NAME[@VERSION] from the store (init=previous)")
    train.add_argument("--name", help="the model name to publish under (default: the architecture)")
    train.add_argument("--out", help="checkpoints and logs; run again with the same --out to resume "
                                     "(default: runs/NAME)")
    train.add_argument("--device", help="cpu, cuda (default: cuda when available)")

    demo = commands.add_parser("demo", help="the whole loop on this machine: generate (or read --task), train, "
                                            "publish, serve, pre-annotate, score")
    demo.add_argument("--out", default="demo-output", help="where everything goes (default %(default)s)")
    demo.add_argument("--task", type=int, help="learn from this CVAT task instead (CVAT_URL and credentials "
                                               "from the environment)")
    demo.add_argument("--model", default="ssdlite320_mobilenet_v3_large", help="architecture (default %(default)s)")
    demo.add_argument("--steps", type=int, default=120, help="training steps (default %(default)s)")

    webhook = commands.add_parser("webhook", help="CVAT webhooks that start training in a function")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True)
    register = webhook_commands.add_parser("register", help="send a project's (or organization's) job updates "
                                                             "to a function's /webhook")
    _cvat_arguments(register)
    register.add_argument("--project", type=int, help="project id (default: an organization webhook, with --org)")
    register.add_argument("--url", required=True, help="the function's webhook URL, e.g. http://host:32001/webhook")
    register.add_argument("--secret", default=os.environ.get("PREANNOTATE_WEBHOOK_SECRET"),
                          help="the function's PREANNOTATE_WEBHOOK_SECRET (default: that env var)")
    register.add_argument("--no-verify-ssl", action="store_true", help="CVAT does not check the URL's certificate")

    serve = commands.add_parser("serve", help="serve a model over HTTP with the routes of the Nuclio function")
    _store_argument(serve)
    serve.add_argument("--model", required=True, help="NAME[@VERSION] in the store, an architecture, or a path")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")

    from preannotate import deploy

    deploy.add_commands(commands, models_commands)  # `deploy` and `models fetch-weights`
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    from preannotate.models import ARCHITECTURES, Manifest, ModelStore

    if args.models_command == "fetch-weights":
        from preannotate.deploy import cmd_fetch_weights

        return cmd_fetch_weights(args)
    store = ModelStore(args.store) if hasattr(args, "store") else None
    if args.models_command == "architectures":
        rows = [{"name": a.name, "output": a.output, "pretrained": a.pretrained_kind, "image_size": a.image_size,
                 "description": a.description} for a in ARCHITECTURES.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['name']:40} {row['output']:10} {row['description']}")
        return 0
    if args.models_command == "list":
        rows = store.describe()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no models in {store.root}")
        else:
            print(f"{'NAME':32} {'VERSION':>7}  {'ARCHITECTURE':38} {'LABELS':>6}  {'mAP@.5':>6}  CREATED")
            for row in rows:
                ap50 = row["metrics"].get("map50")
                print(f"{row['name']:32} {row['version']:>7}{'*' if row['serving'] else ' '} "
                      f"{row['architecture']:38} {row['labels']:>6}  {'' if ap50 is None else f'{ap50:.3f}':>6}  "
                      f"{row['created']}")
            print("* the version served")
        return 0
    if args.models_command == "promote":
        name, _, version = args.model.partition("@")
        if not version.lstrip("v").isdigit():
            raise CommandError(f"give the version to serve as NAME@VERSION, not {args.model!r}")
        store.promote(name, int(version.lstrip("v")))
        print(f"{name}@{int(version.lstrip('v'))} is served from now on")
        return 0
    if args.models_command == "show":
        path = Path(args.model)
        directory = path if (path / "manifest.json").is_file() else store.resolve(args.model)
        print(json.dumps(Manifest.read(directory).to_dict(), indent=2))
        return 0
    if args.models_command == "create":
        from preannotate.models import create_detector, publish_detector
        from preannotate.shapes import parse_label_list

        labels = None
        if args.labels:
            from preannotate.models import get_architecture

            output = get_architecture(args.architecture).output
            labels = parse_label_list(args.labels, default_type="mask" if output == "mask" else "rectangle")
        detector = create_detector(args.architecture, labels, init=args.init, hyperparameters=args.hyperparameters)
        name = args.name or args.architecture
        version = publish_detector(detector, store, name)
        print(f"published {name}@{version} ({args.init}, {len(detector.labels)} labels) in {store.root}")
        return 0
    raise AssertionError(args.models_command)


def cmd_functions(args: argparse.Namespace) -> int:
    from preannotate import functions

    if args.functions_command == "render":
        for path in functions.render_all(Path(args.out)):
            print(path)
        return 0
    directories = []
    for given in map(Path, args.directories):
        found = sorted({p.parent for p in given.rglob("function.yaml")}) if not (given / "function.yaml").exists() \
            else [given]
        if not found:
            raise CommandError(f"no function.yaml under {given}")
        directories += found
    problems = [p for directory in directories for p in functions.validate_directory(directory)]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(directories)} function directories checked, {len(problems)} problems")
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from preannotate.cvat.export import export

    if not 0 <= args.val_fraction < 1:
        raise CommandError("--val-fraction must be at least 0 and below 1")
    with _connect(args) as client:
        summary = export(client, args.out, args.format, task=args.task, job=args.job, project=args.project,
                         val_fraction=args.val_fraction, seed=args.seed, quality=args.quality)
    for split, frames in summary.frames.items():
        print(f"{split}: {frames} frames, {summary.objects.get(split, 0)} objects")
    if summary.skipped:
        print("left out (a detector cannot learn them): "
              + ", ".join(f"{n} {kind}" for kind, n in sorted(summary.skipped.items())))
    print(f"wrote {args.format} to {summary.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from preannotate.cvat.upload import import_file

    with _connect(args) as client:
        report = import_file(client, args.task, args.file, args.format, threshold=args.threshold,
                             label_map=args.label_map, replace=args.replace, coco_file=args.coco_file,
                             progress=sys.stderr.isatty())
    print(f"task {args.task}: {report.frames} frames written, {report.created} shapes created, "
          f"{report.deleted} earlier auto shapes replaced" + (f", {report.resumed} frames done before" if
                                                              report.resumed else ""))
    _report_unmapped(report.unmapped)
    if report.unmatched_images:
        print(f"{len(report.unmatched_images)} images match no frame of the task, e.g. "
              f"{', '.join(report.unmatched_images[:3])}")
    return 0


def _report_unmapped(unmapped) -> None:
    if unmapped:
        print("not in the task (left out; --label-map renames): "
              + ", ".join(f"{label} ({n})" for label, n in unmapped.most_common()))


def _frame_range(text: str | None) -> range | None:
    if not text:
        return None
    first, _, last = text.partition("-")
    if not first.strip().isdigit() or (last and not last.strip().isdigit()):
        raise CommandError(f"--frames {text!r}: give FIRST-LAST, e.g. 0-99")
    return range(int(first), int(last or first) + 1)


def cmd_annotate(args: argparse.Namespace) -> int:
    from preannotate.cvat.annotate import annotate_project, annotate_task

    options = dict(threshold=args.threshold, frames=_frame_range(args.frames),
                   only_unannotated=args.only_unannotated, batch_size=args.batch_size,
                   upload_every=args.upload_every, label_map=args.label_map, progress=sys.stderr.isatty())
    source = dict(detector=args.model, store=args.store, device=args.device) if args.model else dict(
        function_url=args.function_url)
    with _connect(args) as client:
        reports = ({args.task: annotate_task(client, args.task, **source, **options)} if args.task else
                   annotate_project(client, args.project, **source, **options))
    for task_id, report in reports.items():
        print(f"task {task_id}: {report.annotated} frames annotated ({report.frames_per_second:.1f} frames/s), "
              f"{report.created} shapes created, {report.deleted} earlier auto shapes replaced"
              + (f", {report.skipped_annotated} annotated frames left alone" if report.skipped_annotated else "")
              + (f", {report.resumed} frames done before" if report.resumed else ""))
        _report_unmapped(report.unmapped)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from preannotate.formats.dataset import training_split
    from preannotate.models import ModelStore
    from preannotate.models.registry import get_architecture
    from preannotate.training.hyperparameters import Hyperparameters
    from preannotate.training.trainer import TrainingInterrupted, train

    get_architecture(args.model)  # an unknown name fails before anything is downloaded
    if bool(args.data) == bool(args.task or args.project):
        raise CommandError("learn from CVAT (--task/--project) or from an export folder (--data), one of them")
    hp = Hyperparameters().updated(args.hyperparameters)
    name = args.name or args.model
    out = Path(args.out or Path("runs") / name)
    provenance: dict = {}
    if args.data:
        dataset = Path(args.data)
    else:
        from preannotate.training.execute import prepare_dataset

        with _connect(args) as client:
            dataset = prepare_dataset(client, {"tasks": args.task, "project": args.project}, out / "dataset",
                                      hp.val_fraction, hp.seed)
        provenance["cvat"] = json.loads((dataset / "cvat.json").read_text())
    labels, train_items, val_items = training_split(dataset, hp.val_fraction, hp.seed)
    store = ModelStore(args.store)
    previous = store.resolve(args.from_model) if args.from_model else None
    print(f"training {args.model} on {len(train_items)} frames, validating on {len(val_items)}; output in {out}",
          flush=True)
    try:
        result = train(args.model, labels, train_items, val_items, out,
                       store=store, name=name, hyperparameters=args.hyperparameters, previous=previous,
                       provenance=provenance, device=args.device, progress=True)
    except TrainingInterrupted as stopped:
        print(f"preannotate: {stopped}", file=sys.stderr)
        return 130
    metrics = result.metrics
    print(f"published {name}@{result.version} after {result.steps} steps ({result.stopped}): "
          f"mAP@.5 {metrics.get('map50')}, mAP {metrics.get('map')}" + (
              "" if store.serving(name) == result.version else " — kept, not served: it scores below the served "
                                                               "version"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from preannotate.training.demo import run_demo

    run_demo(args.out, architecture=args.model, steps=args.steps, task=args.task, progress=sys.stderr.isatty())
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from preannotate.cvat import webhooks

    if not args.secret:
        raise CommandError("give --secret (or set PREANNOTATE_WEBHOOK_SECRET): the function refuses unsigned "
                           "deliveries")
    with _connect(args) as client:
        created = webhooks.register(client, url=args.url, secret=args.secret, project_id=args.project,
                                    organization=args.org, verify_ssl=not args.no_verify_ssl)
    print(f"webhook {created['id']} sends {', '.join(created['events'])} to {created['target_url']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from preannotate.models import ModelStore
    from preannotate.serving.core import App, ModelProvider
    from preannotate.serving.http import make_server
    from preannotate.serving.training import TrainingRoutes

    app = App(ModelProvider(args.model, ModelStore(args.store), args.device))
    TrainingRoutes.attach(app)  # POST /train, /jobs, /webhook as in the function; jobs train in a process
    app.provider.current()  # load now: fail before listening if the model cannot be served
    server = make_server(app, args.host, args.port)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/ "
          "(POST / with {\"image\": base64}; GET /health, /models)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from preannotate.deploy import cmd_deploy as deploy

    return deploy(args)


COMMANDS = {"models": cmd_models, "functions": cmd_functions, "serve": cmd_serve, "export": cmd_export,
            "webhook": cmd_webhook, "import": cmd_import, "annotate": cmd_annotate,
            "train": cmd_train, "demo": cmd_demo, "deploy": cmd_deploy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from preannotate.cvat.client import CvatError
    from preannotate.models import ModelNotFound
    from preannotate.models.registry import UnknownArchitecture
    from preannotate.serving.core import ModelUnavailable
    from preannotate.training.hyperparameters import HyperparameterError

    try:
        return COMMANDS[args.command](args)
    # RuntimeError covers e.g. pretrained weights that are not on disk
    except (CommandError, CvatError, ModelNotFound, UnknownArchitecture, ModelUnavailable, HyperparameterError,
            ValueError, OSError, RuntimeError) as error:
        print(f"preannotate: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
