"""Go's own text/template (the engine Ollama runs) for the tests: `tests/data/ollama_render/main.go`
is built once per session with the Go toolchain (`apt-get install golang-go`; .ci/run installs it)
and renders a batch of (template, messages) cases per call."""

import json
import os
import shutil
import subprocess

import pytest

SOURCE = os.path.join(os.path.dirname(__file__), "ollama_render", "main.go")


def build_renderer(tmp_dir) -> str:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("the Go toolchain is missing: .ci/run installs golang-go for the Ollama template tests")
        pytest.skip("Go is not installed (apt-get install golang-go) - Ollama templates need Go's text/template")
    binary = os.path.join(tmp_dir, "ollama_render")
    env = dict(os.environ, GOCACHE=os.path.join(tmp_dir, "gocache"), GO111MODULE="off")
    subprocess.run([go, "build", "-o", binary, SOURCE], check=True, env=env, capture_output=True, timeout=600)
    return binary


def render_all(binary: str, cases: list[tuple[str, list[dict]]]) -> list[str]:
    """Render each (template, messages); a Go parse or execution error fails the test with its message."""
    payload = json.dumps([{"template": t, "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
                          for t, msgs in cases])
    done = subprocess.run([binary], input=payload, capture_output=True, text=True, check=True, timeout=60)
    results = json.loads(done.stdout)
    errors = [r["error"] for r in results if r.get("error")]
    assert not errors, errors
    return [r["text"] for r in results]
