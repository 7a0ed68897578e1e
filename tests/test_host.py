"""linearize.host: malloc keeps freed memory on Linux/glibc unless the user opts out."""

import os
import platform
import subprocess
import sys

import pytest


def run(env_extra: dict[str, str]) -> str:
    code = "from linearize.host import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_applies_on_glibc_and_the_opt_out_keeps_the_defaults():
    assert run({"LINEARIZE_SYSTEM_MALLOC": "0"}).strip() == "True"
    assert run({"LINEARIZE_SYSTEM_MALLOC": "1"}).strip() == "False"
