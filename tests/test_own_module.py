"""Your own Flax module (model.module, or model= from a notebook) trains with everything cnn has: summary, pictures,
prediction from any folder, resume after SIGKILL, bf16, two devices, sweeps, fast kernels; and each mistake is one line.

The module lives outside the project, in a file the tests write (as a user's would), and trains on the digits.
"""

import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cnn
from cnn import kernels, models, plots
from cnn.models import module as module_lib
from cnn.models.layers import parameter_count
from cnn.train import setup
from conftest import CONFIGS, REPO

NETS = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class Wide(Net):
    def __call__(self, x, train: bool):
        return super().__call__(x, train)[:, :3]


class NoTrain(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_net(num_classes, width=8):
    return Net(num_classes=num_classes, width=width)
'''


def write_nets(folder, source=NETS, name="nets.py"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source)
    return folder / name


def digits_config(module=None, epochs=6):
    config = cnn.load_config(str(CONFIGS / "digits.py"))
    config.model.layers, config.model.module = (), module
    config.train.num_epochs = epochs
    return config


def reference_count(net, input_shape=(8, 8, 1)):
    variables = net.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
    return parameter_count(variables["params"]) + parameter_count(variables.get("batch_stats", {}))


def load_nets(path):
    return cnn.config.run_file(str(path), "test", "")


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A user's module named by a path relative to the working directory, trained on digits with its pictures:
    (workdir, TrainResult, printed output, the folder it ran in, the nets file)."""
    home = tmp_path_factory.mktemp("own")
    path = write_nets(home / "some" / "dir")
    workdir = home / "run"
    printed, cwd = io.StringIO(), os.getcwd()
    os.chdir(home)
    try:
        with contextlib.redirect_stdout(printed):
            run = cnn.train_and_evaluate(digits_config("some/dir/nets.py:Net(width=16)"), str(workdir))
            plots.write_plots(str(workdir), run, run.dataset)
    finally:
        os.chdir(cwd)
    return workdir, run, printed.getvalue(), home, path


def test_a_module_from_a_file_trains_and_prints_its_exact_parameter_count(own_run):
    workdir, run, printed, _, path = own_run
    assert run.results["test_accuracy"] >= 0.95
    net = load_nets(path).Net(num_classes=10, width=16)
    count = reference_count(net)
    assert 'Model: "Net"' in printed and f"Total params: {count:,}" in printed
    table = printed.split("Layer (type)")[1].split("Total params")[0]
    rows = [line for line in table.splitlines() if " (" in line and ")  " in line]
    assert [r.split()[0] for r in rows] == ["Conv_0", "BatchNorm_0", "Conv_1", "Dropout_0", "Dense_0"]
    assert sum(int(r.split()[-1].replace(",", "")) for r in rows) == count  # the rows add up to the total
    # The parameter tree is the module's own, as Net.init makes it.
    assert jax.tree_util.tree_structure(run.state.params) == jax.tree_util.tree_structure(
        net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"])


def test_config_json_names_the_file_absolutely_and_the_same_command_is_the_same_config(own_run, tmp_path):
    workdir, _, _, home, path = own_run
    recorded = json.loads((workdir / "config.json").read_text())["model"]
    assert recorded["module"] == f"{path}:Net(width=16)" and recorded["layers"] == []
    config = digits_config("some/dir/nets.py:Net(width=16)")
    cwd = os.getcwd()
    try:
        os.chdir(home)  # the same command, from the same folder: the same config
        setup.check_same_config(str(workdir), models.record(config))
        os.chdir(tmp_path)  # from another folder the relative path names another file
        with pytest.raises(cnn.ConfigError, match=r"holds checkpoints of another config: model.module="):
            setup.check_same_config(str(workdir), models.record(config))
    finally:
        os.chdir(cwd)
    assert config.model.module == "some/dir/nets.py:Net(width=16)"  # the caller's config is left alone


def test_predict_command_from_another_folder(own_run, tmp_path):
    workdir, run, _, _, _ = own_run
    image = run.dataset.test.images[0]
    Image.fromarray(image[..., 0]).save(tmp_path / "digit.png")
    out = subprocess.run([sys.executable, "-m", "cnn.predict", f"--workdir={workdir}", "digit.png"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    best = cnn.predict(run, image[None], top_k=1)[0][0][0]
    assert out.stdout.startswith(f"digit.png: {best} (")


def test_pictures_show_every_convolution_of_the_module(own_run):
    workdir, run, _, _, _ = own_run
    assert {"filters.png", "feature_maps.png"} <= set(os.listdir(workdir / "plots"))
    maps = plots.activations(run, run.dataset.test.images[:2])
    assert {name: a.shape for name, a in maps.items()} == {"Conv_0": (2, 8, 8, 16), "Conv_1": (2, 8, 8, 16)}
    kernel = np.asarray(run.state.params["Conv_0"]["kernel"])
    conv = nn.Conv(16, (3, 3)).apply({"params": run.state.params["Conv_0"]},
                                     run.dataset.test.images[:2].astype(np.float32) / 255)
    np.testing.assert_allclose(maps["Conv_0"], conv, atol=1e-5)
    figure = plots.filters(run)
    assert sum(1 for a in figure.axes if a.get_title().isdigit()) == kernel.shape[-1] == 16


def test_a_notebook_module_trains_and_reloads_with_load_run(tmp_path, capsys):
    namespace = {"__name__": "__main__"}  # a notebook cell: its classes live in __main__
    exec(NETS, namespace)
    Net = namespace["Net"]
    run = cnn.train_and_evaluate(digits_config(), str(tmp_path), model=Net(num_classes=10))
    assert run.results["test_accuracy"] >= 0.95
    assert f"Total params: {reference_count(Net(num_classes=10)):,}" in capsys.readouterr().out
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model["module"] is None and model["layers"] == [] and "not importable" in model["note"]
    with pytest.raises(cnn.ConfigError, match=r"config.model names no model: __main__.Net is not importable .*"
                                              r"cnn.load_run\(workdir, model=Net\(...\)\)"):
        cnn.load_run(str(tmp_path))
    loaded = cnn.load_run(str(tmp_path), model=Net(num_classes=10))
    images = run.dataset.test.images[:5]
    np.testing.assert_allclose(plots.probabilities(loaded, images), plots.probabilities(run, images), atol=1e-6)
    assert list(plots.activations(loaded, images[:1])) == ["Conv_0", "Conv_1"]


class Importable(nn.Module):
    num_classes: int
    widths: tuple = (4,)
    scale: float = 1.0

    def __call__(self, x, train: bool):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)) * self.scale)


def test_an_importable_instance_is_recorded_by_its_import_path_and_rebuilt_from_it():
    text, note = module_lib.reference_of(Importable(num_classes=3, widths=(4, 8)))
    assert (text, note) == (f"{__name__}:Importable(widths=(4, 8))", "")
    assert module_lib.build(text, 3) == Importable(num_classes=3, widths=(4, 8))
    assert module_lib.reference_of(Importable(num_classes=3, scale=np.float32(2)))[0] is None  # not a literal


def test_kernel_fast_paths_fire_inside_a_users_module(own_run):
    _, _, _, _, path = own_run
    net = models.adapt(load_nets(path).Net(num_classes=10, width=8))
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1)), jnp.float32)
    variables = net.init(jax.random.key(0), x)
    fast, plain = kernels.apply_fn(net, "auto", "cpu"), kernels.apply_fn(net, "xla", "cpu")
    assert "patches_conv" in kernels.resolve("auto", "cpu")
    assert str(jax.make_jaxpr(fast)(variables, x)) != str(jax.make_jaxpr(plain)(variables, x))
    np.testing.assert_allclose(fast(variables, x), plain(variables, x), atol=1e-5)


def test_bf16_compute(own_run, tmp_path):
    _, _, _, _, path = own_run
    config = digits_config(f"{path}:Net(width=16)", epochs=2)
    config.train.compute_dtype = "bfloat16"
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["test_accuracy"] >= 0.85
    assert jax.tree_util.tree_leaves(run.state.params)[0].dtype == jnp.float32  # bf16 compute, f32 parameters


# --- Mistakes: one line each, nothing in the workdir ------------------------------------------------------------

BROKEN = "import flax.linen as nn\n\n\nimport not_a_package_anyone_has\n"


@pytest.mark.parametrize("reference, message", [
    ("{tmp}/missing.py:Net", "model.module='{tmp}/missing.py:Net': the file '{tmp}/missing.py' does not exist"),
    ("{tmp}/nets.py:Nett", "model.module='{tmp}/nets.py:Nett': {tmp}/nets.py has no 'Nett'; its modules: "
                           "Net, NoTrain, Wide"),
    ("{tmp}/broken.py:Net", "{tmp}/broken.py, line 4: ModuleNotFoundError: No module named "
                            "'not_a_package_anyone_has'"),
    ("no_such_package.nets:Net", "model.module='no_such_package.nets:Net': no module named 'no_such_package'"),
    ("{tmp}/nets.py:Net(widht=3)", "model.module='{tmp}/nets.py:Net(widht=3)': got an unexpected keyword "
                                   "argument 'widht'; Net takes num_classes, width"),
    ("{tmp}/nets.py:Wide", "the model (Wide) returns logits shaped (batch, 3) but the dataset has 10 classes; "
                           "return (batch, num_classes) = (batch, 10)"),
    ("{tmp}/nets.py:NoTrain", "NoTrain.__call__(self, x) takes no `train`; define __call__(self, x, train: bool)"),
    ("{tmp}/nets.py:Net(3)", "write the arguments by name"),
    ("{tmp}/nets.py:Net(width=print('x'))", "is not a module reference"),
    ("{tmp}/nets.py", "is not a module reference: write"),
])
def test_each_mistake_is_one_line_and_leaves_the_workdir_alone(tmp_path, reference, message):
    write_nets(tmp_path)
    write_nets(tmp_path, BROKEN, "broken.py")
    workdir = tmp_path / "w"
    with pytest.raises(cnn.ConfigError) as error:
        cnn.train_and_evaluate(digits_config(reference.format(tmp=tmp_path)), str(workdir))
    assert "\n" not in str(error.value) and message.format(tmp=tmp_path) in str(error.value), str(error.value)
    assert not workdir.exists()


def test_model_fields_set_together_are_refused(tmp_path):
    config = digits_config("nets.py:Net")
    config.model.layers = ("Dense(10)",)
    with pytest.raises(cnn.ConfigError, match=r"model.module='nets.py:Net' and model.layers \(with 1 layers\) are "
                                              r"both set; keep one: set model.layers=\(\) to use the module"):
        models.check_config(config.model)
    config.model.layers, config.model.preset = (), "lenet5"
    with pytest.raises(cnn.ConfigError, match="model.preset='lenet5' and model.module='nets.py:Net' are both set"):
        models.check_config(config.model)


def test_the_command_line_says_a_missing_module_file_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cnn.main", f"--config={CONFIGS / 'digits.py'}",
                          f"--workdir={tmp_path / 'w'}", "--config.model.layers=()",
                          "--config.model.module=nowhere/nets.py:Net(width=8)"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: model.module='nowhere/nets.py:Net(width=8)': the file 'nowhere/nets.py' "
                                 "does not exist") and not (tmp_path / "w").exists()


# --- The command line: resume after SIGKILL, two devices, a sweep over the module's arguments --------------------

# 89 steps an epoch. Only the run to be killed saves often (checkpoint_every_steps may differ on a rerun).
CLI_ARGS = ["--config.train.num_epochs=2", "--config.train.batch_size=16", "--config.train.checkpoint_every_steps=0",
            "--config.train.log_every_steps=5", "--config.train.pictures=False", "--config.model.layers=()"]


def start(workdir, nets, *extra):
    command = [sys.executable, "-m", "cnn.main", f"--config={CONFIGS / 'digits.py'}", f"--workdir={workdir}",
               *CLI_ARGS, f"--config.model.module={nets}:Net(width=8)", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(workdir, nets, *extra):
    out, err = (proc := start(workdir, nets, *extra)).communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def records(workdir, name="metrics.jsonl"):
    timing = {"epoch_seconds", "images_per_second", "input_seconds", "elapsed_seconds", "time"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (workdir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The module trained by `cnn.main` on one device without interruption: (workdir, nets file)."""
    home = tmp_path_factory.mktemp("own-cli")
    nets = write_nets(home)
    finish(home / "reference", nets, "--config.train.num_devices=1")
    return home / "reference", nets


def test_sigkill_then_the_same_command_resumes_exactly(cli_reference, tmp_path):
    reference, nets = cli_reference
    proc = start(tmp_path, nets, "--config.train.num_devices=1", "--config.train.checkpoint_every_steps=7")
    saved = lambda: [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()] \
        if (tmp_path / "checkpoints").exists() else []
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and max(saved(), default=0) < 40:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "results.json").exists(), "the run finished before it could be killed"
    assert "resuming from the checkpoint at step" in finish(tmp_path, nets, "--config.train.num_devices=1")
    assert records(tmp_path) == records(reference)
    assert records(tmp_path, "steps.jsonl") == records(reference, "steps.jsonl")


def test_two_devices_match_one_and_two_processes_match_two_devices(cli_reference, tmp_path):
    """A user's module shards as a spec model does: 2 devices follow 1 device's trajectory (batch-norm sums are
    added per device, so to 1e-4), and 2 processes of 1 device each run the same partitioned program as 1 process
    of 2 devices."""
    reference, nets = cli_reference
    assert "on 2 cpu device(s)" in finish(tmp_path / "devices", nets, "--config.train.num_devices=2")
    trajectory = lambda w: np.array([[r["train_loss"], r["test_loss"], r["test_accuracy"]] for r in records(w)])
    np.testing.assert_allclose(trajectory(tmp_path / "devices"), trajectory(reference), rtol=1e-4)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [start(tmp_path / "processes", nets, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                       f"--process_id={i}", "--config.train.num_devices=1") for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    assert "on 2 cpu device(s) in 2 processes" in outputs[0][0]
    np.testing.assert_allclose(trajectory(tmp_path / "processes"), trajectory(tmp_path / "devices"), rtol=1e-5)


def test_a_sweep_over_the_modules_arguments(tmp_path, capsys):
    """Each trial's command line sets the module's arguments; cli_reference shows cnn.main takes such a line."""
    import cnn.cli.sweep as cli

    sweep = tmp_path / "s.py"
    sweep.write_text(textwrap.dedent(f'''
        def get_sweep():
            return dict(config="{CONFIGS / 'digits.py'}", fixed={{"model.layers": "()"}},
                        space={{"model.module": ["nets.py:Net(width=4)", "nets.py:Net(width=6)"]}})
    '''))
    assert cli.main(["cnn.sweep", str(sweep), f"--workdir={tmp_path / 'w'}", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[-1] for line in lines] == ["--config.model.module=nets.py:Net(width=4)",
                                                         "--config.model.module=nets.py:Net(width=6)"]
    folders = {next(a for a in shlex.split(line) if a.startswith("--workdir=")) for line in lines}
    assert len(folders) == 2
