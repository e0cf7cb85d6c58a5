"""Test setup. Without a visible CUDA device, Triton kernels run in the interpreter on CPU tensors:
TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, first.

DEEPLAB_OPS_TEST_NO_INTERPRETER=1 leaves the interpreter off (TRITON_INTERPRET unset) as on a GPU machine: every
test that needs triton then runs on CUDA tensors or is skipped with a reason that says a GPU is needed
(helpers.TRITON_DEVICE, helpers.needs_triton). DEEPLAB_OPS_TEST_SIGNATURES=1 prints, at the end, how many distinct
Triton JIT specializations the tests launched (count_launches().signatures; per process under xdist): what a GPU
run compiles, tuning candidates aside."""

import os
import zlib


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# Tuned Triton configurations are not kept on disk while testing: a winner a user's runs kept must not serve the
# tests' tuning, nor the tests' winners a user's runs (tests of the kept winners use folders of their own).
os.environ["DEEPLAB_OPS_TUNING_CACHE"] = "off"

# Inductor's on-disk cache does not tell kernels generated for one vector width from another's: after a run under
# ATEN_CPU_CAPABILITY=avx2, a default (AVX-512) run reused the cached 8-lane loops with 16-lane stores and wrote past
# its buffers (heap corruption, NaN outputs in tests/ops/test_winograd_cpu.py::test_compiled_eval_model_matches_eager),
# and the other way round. A run that picks its ISA gets a cache folder of its own (unless one is set).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

if os.environ.get("DEEPLAB_OPS_TEST_NO_INTERPRETER", "0") not in ("", "0"):
    os.environ.pop("TRITON_INTERPRET", None)
elif not _cuda_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import auto_workers, available_memory, share_cores_between_workers  # noqa: E402

import deeplab_ops  # noqa: E402,F401

# Under pytest-xdist each worker takes its share of the cores for torch's threads (helpers.py).
share_cores_between_workers()


@pytest.hookimpl(optionalhook=True, wrapper=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: helpers.auto_workers of xdist's count and the available memory; a number in
    $PYTEST_XDIST_AUTO_NUM_WORKERS as given."""
    count = yield
    try:
        int(os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", ""))
        return count  # the user's number, as xdist read it
    except ValueError:  # unset, or not a number (xdist warned and counted the cores)
        return auto_workers(count, available_memory())


def pytest_sessionstart(session):
    """With the interpreter on, stop at once, saying why, where this Triton's interpreter cannot run a loop over a
    runtime bound with this numpy (Triton before 3.8 with numpy >= 2.4, seen with 3.4 and 3.6: every triton test
    would fail in the interpreter with "only 0-dimensional arrays can be converted to Python scalars")."""
    from deeplab_ops.common import interpreter_active

    if not interpreter_active():
        return
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return  # no Triton: the triton tests skip, saying so

    @triton.jit
    def _loop_probe(out_ptr, n):
        acc = 0.0
        for _ in range(0, n):
            acc += 1.0
        tl.store(out_ptr, acc)

    out = torch.zeros(1)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as e:  # the interpreter's own error, whatever its class
        import numpy

        pytest.exit(f"the Triton interpreter (triton {triton.__version__}) cannot run deeplab_ops' kernels with numpy "
                    f"{numpy.__version__}: {e!r}. Install numpy<2.4 (pip install 'numpy<2.4') or triton>=3.8, or run "
                    f"the tests on a GPU", returncode=4)
    if out.item() != 3.0:
        pytest.exit(f"the Triton interpreter (triton {triton.__version__}) ran a 3-step loop to {out.item()}",
                    returncode=4)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs everywhere, failures replayable.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


_SIGNATURES = set() if os.environ.get("DEEPLAB_OPS_TEST_SIGNATURES", "0") not in ("", "0") else None


_PER_TEST: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _collect_signatures(request):
    if _SIGNATURES is None:
        yield
        return
    from deeplab_ops.triton import count_launches

    with count_launches() as count:
        yield
    _PER_TEST[request.node.nodeid] = len(count.signatures - _SIGNATURES)
    _SIGNATURES.update(count.signatures)


def pytest_terminal_summary(terminalreporter):
    if _SIGNATURES is not None and not _PER_TEST:
        terminalreporter.write_line("deeplab_ops: no test ran in this process (none selected, or xdist workers ran "
                                    "them): count the Triton JIT specializations without -n")
    elif _SIGNATURES is not None:
        kernels = sorted({s.kernel for s in _SIGNATURES})
        terminalreporter.write_line(f"deeplab_ops: {len(_SIGNATURES)} distinct Triton JIT specializations launched "
                                    f"(kernels: {', '.join(kernels)}); the tests that added most:")
        for nodeid, n in sorted(_PER_TEST.items(), key=lambda t: -t[1])[:10]:
            terminalreporter.write_line(f"  {n:4d}  {nodeid}")


@pytest.fixture
def no_tf32():
    """float32 comparisons against float64 use float32 tolerances: TF32 off unless a test turns it on."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def pytest_report_header(config):
    return (
        f"deeplab_ops: torch {torch.__version__}, cuda visible: {torch.cuda.is_available()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
    )
