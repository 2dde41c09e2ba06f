"""Every verb against bad and hostile input (the table in ``bad_inputs.py``): exit code 2, one
``llmlite: error:`` line naming the option or file at fault, no traceback, and the workspace
exactly as it was."""

from __future__ import annotations

import pytest
from bad_inputs import CASES, build_workspace, check

pytestmark = pytest.mark.slow  # builds a workspace by quantizing, training and reporting


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dir):
    return build_workspace(tmp_path_factory.mktemp("bad-inputs") / "ws", tiny_dir)


def test_the_table_covers_every_verb():
    from llmlite.cli import VERBS

    verbs = {name.split(":")[0] for name in CASES}
    assert verbs >= set(VERBS), f"no bad-input case for: {sorted(set(VERBS) - verbs)}"
    assert len(CASES) >= 139  # at least the first probe's count


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(workspace, name):
    check(name, workspace)
