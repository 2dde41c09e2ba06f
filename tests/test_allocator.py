"""The allocator setting returns a freed layer-sized block to the system at once."""

import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
from llmlite.allocator import map_large_blocks

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

big = torch.ones(4 << 20)  # 16 MiB: freeing it raises glibc's dynamic mmap threshold to 16 MiB
del big
if sys.argv[1] == "set":
    assert map_large_blocks()
block = torch.ones(2 << 20)  # 8 MiB, below the raised threshold
before = rss()
del block
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
@pytest.mark.parametrize("mode", ["set", "default"])
def test_freed_block_leaves_rss(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    released = int(out.stdout.split()[-1])
    if mode == "set":
        assert released >= 7 << 20
    else:  # the behaviour the setting fixes: the freed block stays resident
        assert released < 1 << 20
