"""The image model type on the command line: what `cake serve`/`cake run` say when the
model is missing, of another architecture, or asked for a size it cannot draw."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("cake.testing.tiny_images", reason="image models are not installed")

from conftest import free_port  # noqa: E402
from test_images import ONE_THREAD, tiny_pipeline  # noqa: E402


def cake(*args: str, env: dict | None = None) -> subprocess.Popen:
    if args[0] == "serve":  # each its own port: a server binds before it loads
        args = (*args, "--api", f"127.0.0.1:{free_port()}")
    return subprocess.Popen([sys.executable, "-m", "cake", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD, **(env or {})})


def test_startup_errors_are_clear(tmp_path_factory, tmp_path):
    flux = str(tiny_pipeline(tmp_path_factory, "flux1"))
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    cases = [  # started together: each is a Python start-up, mostly
        (cake("serve", "--model-type", "image-model", env=offline),
         "no embedded default image model"),
        (cake("run", flux, "--model-type", "image-model", "--image-model-arch", "sd", "x"),
         "--image-model-arch sd was given, but the checkpoint is a FluxPipeline"),
        (cake("serve", flux, "--model-type", "image-model", "--flux-width", "33"),
         "width 33 is not accepted by FLUX.1-dev: sides must be multiples of 2"),
        (cake("serve", "nobody/nothing", "--model-type", "image-model", env=offline),
         "cannot get nobody/nothing"),
    ]
    for proc, message in cases:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert message in err, err[-2000:]
