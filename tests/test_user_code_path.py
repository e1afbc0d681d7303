"""A config's ``package.module:function`` (a policy loss, a reward function, an item parser) is imported from the
current directory whether the run has one process (``tokenweave train``, whose script directory, not the current one,
is first on ``sys.path``) or a launcher started it (``python -m``, which puts the current directory there): the same
code on one process as on many."""

import subprocess
import sys


def test_a_user_module_in_the_current_directory_is_found_without_it_on_sys_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def length_reward(completions, **kwargs):\n    return [1.0]\n")
    code = ("import os, sys\nassert os.getcwd() not in sys.path and '' not in sys.path\n"
            "from tokenweave.registry import lookup\n"
            "print(lookup('my_rewards:length_reward', {}, 'reward function').__name__)")
    finished = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "length_reward"
