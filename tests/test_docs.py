"""The README stays a short first page and the docs/ site stays whole: it builds with `mkdocs build --strict` (every
page, link and anchor resolves), the README's links point at files that exist, and no page names a path on the
machine it was written on. The benchmarks' records (experiments/benchmark.py) are pages of that site."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
# Paths that name one machine rather than the repository: a parent folder, or the dev machine's work, temporary,
# home and system folders (user-facing examples such as $SCRATCH or /local/scratch are fine).
MACHINE_PATH = re.compile(r"(?<![\w.])\.\./|(?<![\w$])/(?:work|tmp|home|root|opt|mnt)/|shared/datasets")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "experiments" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into a page of docs/"


def test_readme_links_point_at_files():
    targets = [t for t in LINK.findall(README.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets, "the README links no page of docs/"
    missing = [t for t in targets if not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_no_path_outside_the_repository(path):
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
             if MACHINE_PATH.search(line)]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_machine_path_pattern_catches_what_it_should():
    machine = ("../shared/x", "see /work/main", "--data_dir=/tmp/tfds", "/root/.cache", "shared/datasets/mnist")
    assert all(MACHINE_PATH.search(s) for s in machine)
    assert not any(MACHINE_PATH.search(s) for s in ("docs/data.md", "~/.cache/cnn", "$SCRATCH/x", "$TMPDIR/y"))


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[dev]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                             "--config-file", str(REPO / "mkdocs.yml")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "performance" / "index.html").exists()


def test_benchmark_records_its_output(tmp_path, monkeypatch):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "cpu_info", lambda: {"name": "Intel(R) Xeon(R) Gold 6430 CPU @ 2.10GHz",
                                                         "cores": "2", "units": "avx2 avx512f amx_bf16"})
    monkeypatch.setattr(benchmark, "_accelerator", lambda: "none")
    now = time.strptime("2026-12-05 10:30", "%Y-%m-%d %H:%M")
    output = f"ratio 1.32x; data in {benchmark.REPO}/runs and {benchmark.tempfile.gettempdir()}/tfds\n"
    argv = ["experiments/benchmark.py", "targets", "--manual_dir=../shared/datasets/mnist", "--rounds", "2"]
    page = benchmark.write_record(output, argv, str(tmp_path), now)
    benchmark.write_record("second run\n", ["experiments/benchmark.py", "logging"], str(tmp_path), now)

    assert pathlib.Path(page).name == "2026-12-05-intel-xeon-gold-6430.md"
    text = pathlib.Path(page).read_text()
    assert "| CPU | Intel(R) Xeon(R) Gold 6430 CPU @ 2.10GHz |" in text and "avx512f amx_bf16" in text
    assert "`python experiments/benchmark.py targets --manual_dir=DIR --rounds 2`" in text
    assert "ratio 1.32x; data in ./runs and $TMPDIR/tfds" in text and "second run" in text
    assert re.search(r"jax \d", text) and text.count("| CPU |") == 1  # one page per machine and day, runs appended
    assert not MACHINE_PATH.search(text)
    index = (tmp_path / "index.md").read_text()
    assert "[2026-12-05-intel-xeon-gold-6430](2026-12-05-intel-xeon-gold-6430.md)" in index


def test_recording_tees_what_a_benchmark_prints(tmp_path, monkeypatch, capsys):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "RECORD_DIR", str(tmp_path / "on"))
    monkeypatch.setattr(sys, "argv", ["experiments/benchmark.py", "throughput"])
    with benchmark.recording():
        print("cnn bfloat16   7,148 images/s")
    with benchmark.recording(enabled=False):  # --no_record
        print("not recorded")
    assert "7,148 images/s" in capsys.readouterr().out  # still printed
    pages = [p for p in (tmp_path / "on").iterdir() if p.name != "index.md"]
    assert len(pages) == 1 and "cnn bfloat16   7,148 images/s" in pages[0].read_text()
    assert "not recorded" not in pages[0].read_text()


def test_hold_isa_holds_both_frameworks_and_says_so(monkeypatch):
    """--hold_isa avx2: oneDNN, XLA's code and ATen held to AVX2 in every process the benchmark starts (XLA's own
    flags kept); the heading names the hold, and the bf16 variants stay out, as on an AVX2-only CPU."""
    benchmark = load_benchmark()
    environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    monkeypatch.setattr(os, "environ", {**environ, "XLA_FLAGS": "--xla_dump_to=/tmp/x"})  # restored after the test
    assert benchmark.held_isa() == ""
    benchmark.hold_isa("avx2")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2" and os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_max_isa=AVX2"
    assert benchmark.held_isa() == "avx2" and "held to it" in benchmark.cpu_model()
    assert not benchmark.has_bf16_units()
    assert not any("bf16" in name or "bfloat16" in name for name in benchmark.default_variants())
