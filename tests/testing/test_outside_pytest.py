"""`sparsec.testing.assert_pass_preserves` works in a plain script (no pytest, no profile)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import time
    import torch
    from hypothesis import settings
    from sparsec import Pass, PassResult
    from sparsec.testing import assert_pass_preserves, strategies
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class SlowNoop(Pass):
        name = "slow-noop-19"

        def run(self, program):
            time.sleep(0.25)  # longer than hypothesis' default 200 ms deadline
            return PassResult(modified=False)

    # a 200 ms deadline, stated: under CI hypothesis' default profile has none
    settings.register_profile("few", max_examples=3, deadline=200)
    settings.load_profile("few")
    assert settings.default.deadline is not None
    assert_pass_preserves(SlowNoop(), strategies.models())
    print("ok")
''')


def test_assert_pass_preserves_in_a_plain_script(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, str(script)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")
