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
    # from the source tree, as the examples say: their relative paths
    # (Lua scripts, users files) are relative to it
    r = subprocess.run([BIN, "check-config", "-c", path], capture_output=True, text=True,
                       timeout=30, cwd=SRC)
    assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"
    assert r.stdout == "ok\n"


def test_embedded_default_passes_check_config():
    r = subprocess.run([BIN, "check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"


def test_check_config_compiles_the_lua_script(tmp_path):
    good = os.path.join(SRC, "scripts", "policy.lua")
    cfg = tmp_path / "lua-good.yaml"
    cfg.write_text("listeners: [{address: \"127.0.0.1:2525\"}]\n"
                   f"lua: {{script: \"{good}\"}}\n")
    r = subprocess.run([BIN, "check-config", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"

    bad = tmp_path / "broken.lua"
    bad.write_text("-- a policy with a syntax error on line 3\n"
                   "petrel.on(\"helo\", function(conn, name)\n"
                   "  if name == then return end\n"
                   "end)\n")
    cfg = tmp_path / "lua-bad.yaml"
    cfg.write_text("listeners: [{address: \"127.0.0.1:2525\"}]\n"
                   f"lua: {{script: \"{bad}\"}}\n")
    r = subprocess.run([BIN, "check-config", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == ""
    assert "broken.lua:3:" in r.stderr, r.stderr
    assert "lua.script" in r.stderr, r.stderr
