"""The shipped configurations stay in step with the code: config/petrel.yaml
and every examples/*.yaml pass `petrel check-config`."""
import glob
import os
import subprocess

import pytest

SRC = os.environ.get("PETREL_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("PETREL_BIN", os.path.join(SRC, "build-test", "petrel"))
CONFIGS = sorted(glob.glob(os.path.join(SRC, "examples", "*.yaml"))) + [
    os.path.join(SRC, "config", "petrel.yaml")]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_passes_check_config(path):
    r = subprocess.run([BIN, "check-config", "-c", path], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"
    assert r.stdout == "ok\n"


def test_embedded_default_passes_check_config():
    r = subprocess.run([BIN, "check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
