"""The command line as a newcomer meets it: help, versions, clear refusals, and `train`'s promotion and restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from preannotate import __version__
from preannotate.cli import _count, build_parser
from preannotate.cli import main as cli
from preannotate.formats.dataset import export_dataset
from preannotate.models import Manifest, ModelStore
from preannotate.shapes import parse_label_list
from preannotate.training.synthetic import generate

REPOSITORY = Path(__file__).parent.parent


def test_every_option_has_help_and_help_shows_no_markup(capsys):
    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            if action.choices and hasattr(action, "_name_parser_map"):
                pending += list(action.choices.values())
            elif action.dest not in ("help", "version"):
                assert action.help, f"{current.prog}: {'/'.join(action.option_strings) or action.dest} has no help"
        assert "``" not in current.format_help()


def test_version_and_verbose_after_the_command(capsys):
    with pytest.raises(SystemExit):
        cli(["--version"])
    assert capsys.readouterr().out.strip() == f"preannotate {__version__}"
    assert build_parser().parse_args(["models", "architectures", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "models", "architectures"]).verbose is True


def test_counts_agree_with_their_noun():
    assert (_count(1, "frame"), _count(2, "frame"), _count(0, "shape")) == ("1 frame", "2 frames", "0 shapes")


def test_a_mistyped_store_is_an_error_not_an_empty_store(tmp_path, capsys):
    missing = tmp_path / "stroe"
    assert cli(["models", "list", "--store", str(missing)]) == 2
    assert f"no model store at {missing}" in capsys.readouterr().err and not missing.exists()


def test_models_list_columns_line_up(tmp_path, capsys):
    store = str(tmp_path)
    for name in ("a", "a-much-longer-model-name"):
        assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "cat", "--name", name,
                    "--store", store]) == 0
    capsys.readouterr()
    assert cli(["models", "list", "--store", store]) == 0
    header, first, second, _ = capsys.readouterr().out.splitlines()
    assert header.index("VERSION") == first.index("1*") == second.index("1*")
    assert header.index("ARCHITECTURE") == first.index("ssdlite") == second.index("ssdlite")


def test_labels_a_model_cannot_fill_are_refused(tmp_path, capsys):
    assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "car:points,bus",
                "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot fill car (points)" in err and "rectangle, any" in err
    assert ModelStore(tmp_path).names() == []
    assert cli(["models", "create", "maskrcnn_resnet50_fpn", "--labels", "road:polygon,car:mask",
                "--store", str(tmp_path), "-H", "image-size=96; max-image-size=128"]) == 0


def test_a_random_model_says_it_is_random(tmp_path):
    assert cli(["models", "create", "ssdlite320_mobilenet_v3_large", "--labels", "cat", "--store", str(tmp_path)]) == 0
    manifest = Manifest.read(ModelStore(tmp_path).resolve("ssdlite320_mobilenet_v3_large"))
    assert manifest.hyperparameters["init"] == "random" and manifest.provenance["init"] == "random"


def test_a_bad_hyperparameter_value_is_one_plain_sentence(tmp_path, capsys):
    assert cli(["train", "--data", str(tmp_path), "--model", "ssdlite320_mobilenet_v3_large",
                "-H", "batch-size=abc", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "bad value for batch-size: 'abc' is not a whole number" in err and "invalid literal" not in err


def test_ssd_trains_and_serves_at_another_square_size(tmp_path):
    from preannotate.models import create_detector

    detector = create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("a"), init="random",
                               hyperparameters="image-size=512")
    assert detector.model.transform.fixed_size == (512, 512)
    assert detector.manifest.input_size["image_size"] == 512
    import numpy as np

    assert isinstance(detector.detect([np.zeros((100, 200, 3), np.uint8)], 0.0)[0], list)


def test_a_busy_port_fails_at_once_naming_it(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli(["serve", "--model", "anything", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_training_on_a_folder_that_is_no_dataset_is_refused_in_one_sentence(tmp_path, capsys):
    from tests.test_dataset import demo_output

    folder = demo_output(tmp_path / "demo-output")
    assert cli(["train", "--data", str(folder), "--model", "ssdlite320_mobilenet_v3_large", "--store",
                str(tmp_path / "store"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"preannotate: error: {folder} holds no dataset: a COCO folder") and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and ModelStore(tmp_path / "store").names() == []


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:1", "GPU"])
@pytest.mark.parametrize("command", [
    ["annotate", "--task", "1", "--model", "ssdlite320_mobilenet_v3_large"],
    ["train", "--data", "nowhere", "--model", "ssdlite320_mobilenet_v3_large"],
    ["serve", "--model", "ssdlite320_mobilenet_v3_large", "--port", "0"],
])
def test_a_device_this_machine_lacks_is_refused_naming_what_it_has(no_gpu, capsys, tmp_path, command, device):
    assert cli([*command, "--store", str(tmp_path), "--device", device]) == 2
    assert capsys.readouterr().err == f"preannotate: error: --device {device}: this machine has no CUDA GPU; it " \
                                      "has cpu\n"


def test_devices_are_named_as_torch_names_them_and_checked_against_the_machine(monkeypatch):
    import torch
    from preannotate.devices import DeviceError, checked, from_environment

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert [checked(name) for name in ("gpu", "GPU:0", "cuda", "cuda:0", "cpu", " CPU ", None, "")] == \
        ["cuda", "cuda:0", "cuda", "cuda:0", "cpu", "cpu", None, None]
    for name, why in (("cuda:1", "this machine has no cuda:1; it has cpu, cuda:0"),
                      ("gpu:1", "this machine has no cuda:1; it has cpu, cuda:0"),
                      ("tpu", "this machine knows no such device (give cpu, cuda, cuda:N or gpu); it has cpu, cuda:0")):
        with pytest.raises(DeviceError) as refused:
            checked(name)
        assert str(refused.value) == f"--device {name}: {why}"
    with pytest.raises(DeviceError, match="^PREANNOTATE_DEVICE cuda:3: this machine has no cuda:3"):
        from_environment({"PREANNOTATE_DEVICE": "cuda:3"})
    assert from_environment({}) is None


def test_a_function_whose_device_this_machine_lacks_does_not_start(no_gpu, tmp_path):
    from preannotate.devices import DeviceError
    from preannotate.serving.core import App

    with pytest.raises(DeviceError, match="^PREANNOTATE_DEVICE cuda: this machine has no CUDA GPU; it has cpu$"):
        App.from_environment({"PREANNOTATE_MODEL": "ssdlite320_mobilenet_v3_large", "PREANNOTATE_DEVICE": "cuda",
                              "PREANNOTATE_MODEL_STORE": str(tmp_path)})


def test_the_device_check_imports_no_framework_until_a_device_is_named():
    script = ("import sys; from preannotate import devices; devices.checked(None); "
              "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_test_suite_leaves_no_scratch_folder(tmp_path):
    """The suite's scratch directory (chunk caches, journals) is removed when the test process ends."""
    subprocess.run([sys.executable, "-c", "import tests.conftest"], cwd=REPOSITORY, check=True, timeout=120,
                   env={**os.environ, "TMPDIR": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_tensorflow_starts_without_its_cpp_chatter():
    script = "from preannotate.formats import tfrecord; tfrecord.tensorflow()"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stderr == ""


TINY = "init=random; num-steps=2; batch-size=2; image-size=64; max-image-size=96; num-validations=1"


def _folder(path: Path, val: bool) -> Path:
    task = generate(8, 80, 60, seed=1, labels=("box", "disc"))
    export_dataset(path, "coco", task.annotations.labels, sorted(task.annotations.frames.items()), task.images,
                   val_fraction=0.4 if val else 0.0, progress=False)
    return path


def _served_better(store: Path) -> None:
    """A served version that scored mAP 0.99 (a manifest and stand-in weights: promotion reads only metrics)."""
    def write(directory):
        (directory / "model.pt").write_bytes(b"w")
        return Manifest(architecture="fasterrcnn_mobilenet_v3_large_320_fpn", labels=parse_label_list("box,disc"),
                        metrics={"map": 0.99, "map50": 0.99})
    ModelStore(store).publish("shapes", write)


def test_train_keeps_a_worse_version_unserved_and_an_unscored_one_too(tmp_path, capsys):
    store = tmp_path / "store"
    _served_better(store)
    common = ["train", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--store", str(store), "--name", "shapes"]
    assert cli([*common, "--data", str(_folder(tmp_path / "scored", True)), "-H", TINY,
                "--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "published shapes@2" in out and "kept, not served" in out and "0.990 of shapes@1" in out
    assert ModelStore(store).serving("shapes") == 1
    assert "training report: " in out and (store / "shapes" / "v2" / "report.png").is_file()

    assert cli([*common, "--data", str(_folder(tmp_path / "unscored", False)), "-H", TINY + "; val-fraction=0",
                "--out", str(tmp_path / "run3")]) == 0
    out = capsys.readouterr().out
    assert "published shapes@3" in out and "mAP@.5 none (not validated)" in out
    assert "kept, not served: it was not scored (no validation frames)" in out
    assert ModelStore(store).serving("shapes") == 1

    assert cli([*common, "--data", str(tmp_path / "scored"), "-H", TINY,
                "--out", str(tmp_path / "run3"), "--promote", "always"]) == 2  # another run in run3
    assert "use --restart to start it over, or another --out" in capsys.readouterr().err
    assert cli([*common, "--data", str(tmp_path / "scored"), "-H", TINY, "--out", str(tmp_path / "run3"),
                "--promote", "always", "--restart"]) == 0
    assert "published shapes@4" in capsys.readouterr().out and ModelStore(store).serving("shapes") == 4
    assert json.loads((tmp_path / "run3" / "result.json").read_text())["version"] == 4
