"""Shared fixtures: a tiny dataset made by the project's own generator, built once per session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run interpreted on a CPU-only machine. Set before any test module
    # imports triton: a triton imported with the interpreter off cannot interpret kernels
    # decorated later (helpers then fail "outside of the scope of a kernel"), whatever the
    # order in which pytest collects the modules. kernels/aot.py compiles its own copies
    # with the interpreter off.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastfilm.config import GenerateConfig

@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module's tests, restored after. Their tensors are
    tiny: on a shared 2-core machine a second thread costs more in OpenMP synchronisation
    than it computes. A module opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_FAMILIES = "zero_hop_exist,zero_hop_query_color,zero_hop_query_shape,compare_color"


@pytest.fixture(scope="session")
def generated_clevr(tmp_path_factory):
    """A CLEVR-layout directory: 12 train / 4 val images at 48x32, 4 questions each, RGBA PNGs."""
    from fastfilm.data.generate import run

    out = tmp_path_factory.mktemp("clevr") / "CLEVR_tiny"
    cfg = GenerateConfig(out=str(out), train_images=12, val_images=4, questions_per_image=4, image_width=48,
                         image_height=32, min_objects=3, max_objects=4, families=TINY_FAMILIES, seed=1, workers=1)
    assert run(cfg) == 0
    return out


# A cache build that dies mid-way: image decoding finishes, says so, then stalls to be killed.
_STALL_AFTER_DECODING = textwrap.dedent("""
    import sys, time
    import fastfilm.data.cache as c
    real = c.decode_images
    def slow(*a, **k):
        out = real(*a, **k)
        print("decoded", flush=True)
        time.sleep(120)
        return out
    c.decode_images = slow
""")


def kill_after_decoding(build: str, data) -> None:
    """Run `build` (Python text; `c` is fastfilm.data.cache, sys.argv[1] is `data`) in a child
    process whose image decoding stalls once done, and SIGKILL it there: a build killed after
    decoding, before the cache is complete."""
    proc = subprocess.Popen([sys.executable, "-c", _STALL_AFTER_DECODING + textwrap.dedent(build), str(data)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "decoded"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
