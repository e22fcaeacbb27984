"""Issue 20, case 6: ``flops`` with run settings no method can use is a one-line error (it printed
the full row alone and exited 0); ``build --model hunyuan-video-tiny --random-init`` works on its
own defaults (K=32 image clusters, the text's K at most its 16 tokens); a writer killed with
``kill -9`` part-way through an output leaves a hidden temporary file that the next write of that
output removes (a live writer's is left alone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import clusca_trt
from clusca_trt.cli import main
from clusca_trt.errors import ConfigError

from .conftest import cli_error


@pytest.mark.parametrize("args, message", [
    (["--interval", "0"], "interval must be an integer >= 1, got 0"),
    (["--interval", "-2"], "interval must be an integer >= 1, got -2"),
    (["--warmup", "0"], "warmup must be an integer >= 1, got 0"),
    (["--order", "9"], "order must be <= the built Taylor order 1, got 9"),
    (["--order", "-1"], "order must be an integer >= 0, got -1"),
])
def test_flops_refuses_run_settings_no_method_can_use(micro, args, message):
    r = CliRunner().invoke(main, ["-q", "flops", str(micro[2].directory), *args])
    assert message in cli_error(r)
    assert "GFLOPs per" not in r.output  # nothing counted or printed first


def test_flops_still_leaves_out_only_the_methods_a_build_cannot_run(micro):
    r = CliRunner().invoke(main, ["-q", "flops", str(micro[2].directory), "--order", "0"])
    assert r.exit_code == 0, r.output
    rows = [ln.split()[0] for ln in r.output.splitlines() if "GFLOPs per 50-step run" in ln]
    assert rows == ["full", "clusca", "fora"]  # taylorseer needs order >= 1


def test_hunyuan_video_tiny_builds_on_its_defaults(monkeypatch, tmp_path):
    """The family's K=32 for 16 text tokens: the text's K defaults to at most its tokens. The export
    itself is replaced here (its graphs take minutes); everything before it is the real build."""
    from clusca_trt.models import load_model
    from clusca_trt.spec import BuildOptions

    model = load_model("hunyuan-video-tiny", random_init=True, seed=0)
    k = model.adapter.default_run.clusters
    spec = model.adapter.export_spec(BuildOptions(clusters=k, order=model.adapter.default_run.order))
    groups = {g.name: (g.tokens, g.clusters) for g in spec.groups}
    assert groups["txt"] == (16, 16) and groups["img"][1] == k == 32

    def export(adapter, spec, out_dir):
        raise ConfigError(f"export reached with K img {spec.groups[0].clusters}, K txt {spec.groups[1].clusters}")

    monkeypatch.setattr("clusca_trt.exporters.build.export_all", export)
    r = CliRunner().invoke(main, ["-q", "build", "--model", "hunyuan-video-tiny", "--random-init",
                                  "--out", str(tmp_path / "hv")])
    assert "export reached with K img 32, K txt 16" in cli_error(r)
    r = CliRunner().invoke(main, ["-q", "build", "--model", "hunyuan-video-tiny", "--random-init", "--text-clusters",
                                  "17", "--out", str(tmp_path / "hv")])
    assert "17" in cli_error(r)  # an explicit text K above the tokens is still refused


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clusca_trt.files import write_atomic

    def slow(tmp):
        Path(tmp).write_bytes(b"part of an output")
        print("writing", flush=True)
        time.sleep(120)

    write_atomic(Path(sys.argv[1]), slow)
""")


def _writer(out: Path) -> subprocess.Popen:
    """A process writing ``out`` through ``write_atomic``, stopped in the middle (its temporary file there)."""
    env = dict(os.environ, PYTHONPATH=str(Path(clusca_trt.__file__).resolve().parent.parent))
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "writing"
    return p


def _hidden(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def test_the_next_write_removes_what_a_killed_writer_left(micro, tmp_path):
    out = tmp_path / "a.npz"
    p = _writer(out)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = _hidden(tmp_path, "a.npz")
    assert len(left) == 1 and not out.exists()  # the debris a kill -9 leaves
    other = tmp_path / ".b.npz.otherhost-1.x.npz"  # another output's, and another machine's: not ours to remove
    other.write_bytes(b"x")
    r = CliRunner().invoke(main, ["-q", "generate", str(micro[2].directory), "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _hidden(tmp_path, "a.npz") == [] and out.is_file() and other.exists()


def test_a_live_writer_s_temporary_file_is_left_alone(tmp_path):
    from clusca_trt.files import write_atomic

    out = tmp_path / "a.npz"
    p = _writer(out)
    try:
        live = _hidden(tmp_path, "a.npz")
        write_atomic(out, lambda tmp: Path(tmp).write_bytes(b"mine"))
        assert out.read_bytes() == b"mine" and _hidden(tmp_path, "a.npz") == live
    finally:
        p.kill()
        p.wait()
