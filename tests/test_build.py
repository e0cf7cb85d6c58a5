"""The build and the package surface: toolkit discovery, import, `python -m deeplab_ops`."""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import deeplab_ops
from deeplab_ops import _extension


def _load_setup():
    spec = importlib.util.spec_from_file_location("deeplab_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only under __main__
    return module


def _fake_toolkit(root: Path) -> Path:
    kit = root / "cuda-13.0"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("")
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake\n")
    nvcc.chmod(0o755)
    return kit


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_toolkit_found_through_a_symbolic_link(tmp_path, clean_env):
    kit = _fake_toolkit(tmp_path)
    bindir = tmp_path / "usr-local-bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(kit / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    home, how = _load_setup().find_cuda_home()
    assert home == str(kit.resolve()), how


def test_toolkit_found_through_a_wrapper_script(tmp_path, clean_env):
    """nvcc may be a shell script that execs the real one: ask it where its toolkit is (--dryrun's TOP)."""
    kit = _fake_toolkit(tmp_path)
    (kit / "bin" / "nvcc").write_text(f"#!/bin/sh\necho '#$ TOP={kit}/bin/..' 1>&2\n")
    bindir = tmp_path / "wrappers" / "bin"
    bindir.mkdir(parents=True)
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    clean_env.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")
    home, how = _load_setup().find_cuda_home()
    assert home == str(kit.resolve()), how


def test_cuda_home_that_is_not_a_toolkit_is_reported(tmp_path, clean_env):
    clean_env.setenv("CUDA_HOME", str(tmp_path))
    home, how = _load_setup().find_cuda_home()
    assert home is None and "not a CUDA toolkit" in how


def test_import_compiles_nothing_and_registers_every_op():
    for op in ("bn_stats", "bn_finalize", "bn_apply", "bn_backward_reduce", "bn_backward_dy", "conv_bn_relu_forward",
               "conv_bn_relu_backward", "conv_bn_relu_eval", "aspp_forward", "aspp_backward", "conv_bias_act"):
        assert _extension.has_kernel(op, "CPU"), op
    assert deeplab_ops.__version__


def test_python_m_deeplab_ops_reports_versions_and_backends():
    env = {k: v for k, v in os.environ.items() if k != "DEEPLAB_OPS_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "deeplab_ops"], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout
    for needle in ("torch", "triton", "deeplab_ops", "CUDA C++ kernels", "backends on cpu", "auto picks",
                   "CPU tensors: cpu"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    # CUDA tensors are judged from the build (a GPU absent now is no reason): triton installed, triton it is.
    if importlib.util.find_spec("triton") is not None:
        assert "CUDA tensors: triton" in out, out


def test_python_m_deeplab_ops_has_help_refuses_unknown_arguments_and_bad_settings():
    # It ignored its arguments (--help printed the report, --frobnicate exited 0) and reported a cpu backend usable
    # under a DEEPLAB_OPS_CPU_WINOGRAD that makes every cpu inference call raise (found by a review).
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPLAB_OPS_BACKEND", "DEEPLAB_OPS_CPU_WINOGRAD")}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    help_ = run([sys.executable, "-m", "deeplab_ops", "--help"], env=env)
    assert help_.returncode == 0 and "usage: python -m deeplab_ops" in help_.stdout
    assert "DEEPLAB_OPS_CPU_WINOGRAD" in help_.stdout and "backends on cpu" not in help_.stdout
    bad = run([sys.executable, "-m", "deeplab_ops", "--frobnicate"], env=env)
    assert bad.returncode == 2 and "unrecognized arguments: --frobnicate" in bad.stderr
    winograd = run([sys.executable, "-m", "deeplab_ops"], env={**env, "DEEPLAB_OPS_CPU_WINOGRAD": "2"})
    assert winograd.returncode == 1
    assert "DEEPLAB_OPS_CPU_WINOGRAD='2' is not a setting" in winograd.stdout, winograd.stdout
    # a valid setting is shown too (it was said only when bad)
    winograd_off = run([sys.executable, "-m", "deeplab_ops"], env={**env, "DEEPLAB_OPS_CPU_WINOGRAD": "0"})
    assert "cpu winograd off (DEEPLAB_OPS_CPU_WINOGRAD=0)" in winograd_off.stdout, winograd_off.stdout
    # a bad DEEPLAB_OPS_AUTOTUNE made every triton call raise while the report said triton was usable; a
    # TRITON_INTERPRET that Triton reads as off ("off") was reported as "1", triton usable (calls then crashed); a
    # reader that stops early (| head -1) got a BrokenPipeError traceback
    autotune = run([sys.executable, "-m", "deeplab_ops"], env={**env, "DEEPLAB_OPS_AUTOTUNE": "sometimes"})
    assert autotune.returncode == 1
    assert "DEEPLAB_OPS_AUTOTUNE='sometimes' is not an autotune mode" in autotune.stdout, autotune.stdout
    off = run([sys.executable, "-m", "deeplab_ops"], env={**env, "TRITON_INTERPRET": "off"})
    assert off.returncode == 0 and "TRITON_INTERPRET='off' (the interpreter is off)" in off.stdout, off.stdout
    assert "triton     unusable: it runs CPU tensors only in the Triton interpreter" in off.stdout, off.stdout
    # where tuned triton winners are kept: the folder set, nowhere for off, else beside Triton's cache
    kept = run([sys.executable, "-m", "deeplab_ops"], env={**env, "DEEPLAB_OPS_TUNING_CACHE": "/some/folder"})
    assert "triton tuning gpu; winners kept in /some/folder (DEEPLAB_OPS_TUNING_CACHE)" in kept.stdout, kept.stdout
    assert "DEEPLAB_OPS_TUNING_CACHE" in help_.stdout
    env_default = {k: v for k, v in env.items() if k != "DEEPLAB_OPS_TUNING_CACHE"}
    default = run([sys.executable, "-m", "deeplab_ops"], env={**env_default, "TRITON_CACHE_DIR": "/tmp/tc"})
    assert "winners kept in /tmp/tc/deeplab_ops_tuning" in default.stdout, default.stdout
    assert env["DEEPLAB_OPS_TUNING_CACHE"] == "off" and "winners kept nowhere" in off.stdout, off.stdout  # conftest
    piped = subprocess.run(f"{shlex.quote(sys.executable)} -m deeplab_ops | head -1", shell=True, capture_output=True,
                           text=True, timeout=120, env=env)
    assert piped.stdout.startswith("python ") and "Traceback" not in piped.stderr, piped.stderr


def test_setup_without_torch_says_what_to_do():
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version'];"
        f"exec(compile(open({str(ROOT / 'setup.py')!r}).read(), 'setup.py', 'exec'), {{'__name__': '__main__'}})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "install torch first" in proc.stderr.lower() or "install torch first" in proc.stdout.lower()
    assert "--no-build-isolation" in proc.stderr + proc.stdout


def test_missing_extension_error_says_how_to_rebuild():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'deeplab_ops._C':\n"
        "            raise ModuleNotFoundError(\"No module named 'deeplab_ops._C'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import deeplab_ops\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "the compiled extension deeplab_ops._C is missing" in proc.stderr, proc.stderr[-2000:]
    assert "pip install --no-build-isolation -e ." in proc.stderr


def test_a_build_without_a_triton_op_schema_is_an_import_error_saying_how_to_rebuild():
    # The triton kernels are registered for the schemas _C defines; one missing is a broken build, never skipped.
    from deeplab_ops import triton as triton_ops

    with pytest.raises(ImportError, match=r"no schema for deeplab_ops::triton_no_such_op.*pip install"):
        triton_ops._register("deeplab_ops::triton_no_such_op", lambda *a: None)


def test_triton_backend_runs_here():
    # triton is a requirement: on a CUDA machine the backend runs CUDA tensors; without a GPU, tests/conftest.py
    # turns on the interpreter, so it must run CPU tensors. The triton tests' "cannot run here" skips are guards
    # for other environments; this keeps them from hiding a broken triton install in CI.
    import torch

    from deeplab_ops import backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("DEEPLAB_OPS_TEST_NO_INTERPRETER", "0") not in ("", "0"):
        pytest.skip("DEEPLAB_OPS_TEST_NO_INTERPRETER=1 turned the interpreter off on purpose, and no GPU is visible")
    reasons = backends.available_backends(device)["triton"]
    assert not reasons, f"triton backend cannot run {device.type} tensors here: {reasons}"


# C++20 features with no C++17 meaning. torch 2.13+ builds extensions as C++20, torch 2.11 (the GPU machine's) as
# C++17, so the build here cannot catch them: std::erase_if once broke the torch 2.11 build while every check here
# passed. The authoritative check is a build on that stack (docs/kernels.md, "Tested stacks"); this scan is the one
# every run makes. Each pattern has an example it must find (test_cxx20_patterns_find_their_examples).
CXX20_ONLY = {  # pattern: (what, an example)
    r"\bstd::erase(_if)?\s*\(": ("std::erase / std::erase_if (use erase-remove)", "std::erase_if(v, pred);"),
    r"#\s*include\s*<(span|ranges|concepts|format|bit|numbers|source_location|compare|semaphore|latch|barrier|"
    r"stop_token|syncstream)>": ("a C++20 header", "#include <span>"),
    r"\bstd::(span|ranges|views|bit_cast|popcount|bit_width|bit_ceil|bit_floor|countl_zero|countr_zero|has_single_bit|"
    r"format|midpoint|lerp|ssize|to_address|source_location|remove_cvref(_t)?|is_constant_evaluated|type_identity|"
    r"make_shared_for_overwrite|jthread)\b": ("a C++20 library name", "int n = std::popcount(x);"),
    r"\.(starts_with|ends_with|contains)\s*\(": ("starts_with / ends_with / contains (C++20 members)",
                                                  "if (name.starts_with(\"a\")) {}"),
    r"<=>": ("the three-way comparison operator", "auto c = a <=> b;"),
    r"\b(consteval|constinit|co_await|co_yield|co_return|char8_t|requires|concept)\b":
        ("a C++20 keyword", "consteval int f() { return 1; }"),
    r"\busing\s+enum\b": ("using enum", "using enum Color;"),
    r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]": ("a C++20 attribute", "if (x) [[likely]] { }"),
    r"(^|[{,(])\s*\.[A-Za-z_]\w*\s*=(?!=)": ("a designated initializer", "Point p{.x = 1, .y = 2};"),
    r"\[[^\]\n]*\]\s*<\s*(typename|class|auto)\b": ("a lambda with a template parameter list",
                                                         "auto f = []<typename T>(T t) { return t; };"),
}


def _code_only(text: str) -> str:
    """C++ source without comments and string/character literals (their text is not code), lines kept."""
    import re

    def blank(match: re.Match) -> str:
        return "\n" * match.group(0).count("\n") if match.group(0).startswith("/*") else \
            (" " if match.group(0).startswith("//") else '""')

    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text, flags=re.S)


def _cxx20_uses(text: str) -> list[tuple[int, str]]:
    import re

    found = []
    for number, code in enumerate(_code_only(text).splitlines(), 1):
        for pattern, (what, _) in CXX20_ONLY.items():
            if re.search(pattern, code):
                found.append((number, what))
    return found


def test_cxx20_patterns_find_their_examples():
    """Each pattern finds its example, and none fires on C++17 code that merely looks alike (comments, strings,
    a member named like a C++20 one, a `.x = ` assignment statement)."""
    for pattern, (what, example) in CXX20_ONLY.items():
        assert any(w == what for _, w in _cxx20_uses(example)), (pattern, example)
    clean = """
        // requires grad; std::erase_if in a comment; a <=> b
        /* consteval
           std::span */
        TORCH_CHECK(ok, "x requires a tensor that contains(3) <=> values");
        v.erase(std::remove_if(v.begin(), v.end(), pred), v.end());
        p.x = 1;
        q->x = 2;
        auto f = [](int t) { return t < 3; };
        char c = '"';
        std::map<int, int> m; m.count(3);
    """
    assert _cxx20_uses(clean) == [], _cxx20_uses(clean)


def test_cxx_sources_are_cxx17():
    """Every C++ and CUDA source compiles as C++17 (torch < 2.13 builds extensions with -std=c++17)."""
    found = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            lines = path.read_text().splitlines()
            found += [f"{path.relative_to(ROOT)}:{n}: {what}: {lines[n - 1].strip()}"
                      for n, what in _cxx20_uses(path.read_text())]
    assert not found, "C++20 in the sources:\n" + "\n".join(found)


# --- build settings and install paths as a user meets them (a review of setup.py) ---------------------------------

def _run_setup(env_overrides: dict, *args: str, cwd=ROOT, pythonpath: str | None = None):
    """`python setup.py --version` (or `args`) in a fresh process: runs setup.py's decisions, compiles nothing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEEPLAB_OPS_CUDA", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "DEBUG",
                        "PYTHONPATH")}
    env.update(env_overrides)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), *(args or ("--version",))], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["0", "abc", "-1", "\u00b2"])  # "²": str.isdigit() says yes, int() says no
def test_max_jobs_that_torch_would_misread_stops_the_build(value):
    # torch passed MAX_JOBS=0 on as `ninja -j 0` (no limit: every compile at once) and ignored "abc" and "-1" (ninja's
    # default, the CPU count + 2): on a shared machine the opposite of what was asked for.
    proc = _run_setup({"DEEPLAB_OPS_CUDA": "0", "MAX_JOBS": value})
    assert proc.returncode != 0 and f"MAX_JOBS={value!r}" in proc.stderr, proc.stdout + proc.stderr


def test_max_jobs_accepts_a_count_and_defaults(clean_env):
    setup = _load_setup()
    clean_env.setenv("MAX_JOBS", "3")
    setup.default_max_jobs()
    assert os.environ["MAX_JOBS"] == "3"
    clean_env.delenv("MAX_JOBS")
    setup.default_max_jobs()
    assert int(os.environ["MAX_JOBS"]) >= 1


def test_debug_values(clean_env):
    # DEBUG=true (or any value but "1") built -O3 without a word.
    setup = _load_setup()
    for value, debug in (("1", True), ("true", True), ("0", False), ("", False)):
        clean_env.setenv("DEBUG", value)
        assert setup.debug_build() is debug, value
    clean_env.setenv("DEBUG", "garbage")
    with pytest.raises(SystemExit, match="DEBUG='garbage' is not understood; expected 1, true, yes, on or y .*, "
                                         "or 0, false, no, off, n or empty"):
        setup.debug_build()
    proc = _run_setup({"DEEPLAB_OPS_CUDA": "0", "DEBUG": "yes please"})
    assert proc.returncode != 0 and "DEBUG='yes please'" in proc.stderr, proc.stdout + proc.stderr


def test_debug_build_keeps_asserts(clean_env):
    # DEBUG=1 compiled -O0 -g but kept Python's -DNDEBUG (sysconfig's flags, which setuptools passes first): every
    # assert and TORCH_INTERNAL_ASSERT_DEBUG_ONLY compiled out of the debug build. -UNDEBUG comes after them.
    setup = _load_setup()
    clean_env.setenv("DEEPLAB_OPS_CUDA", "0")
    clean_env.setenv("MAX_JOBS", "1")  # extensions() sets it when unset: restored by the fixture this way
    for value, debug in (("1", True), ("0", False)):
        clean_env.setenv("DEBUG", value)
        (ext,) = setup.extensions()
        flags = ext.extra_compile_args["cxx"]
        assert ("-UNDEBUG" in flags) is debug and ("-O0" in flags) is debug, (value, flags)


def _versioned_toolkit(root: Path, release: str = "13.0", archs: str = "75 80 86 89 90 100 120") -> Path:
    """A fake toolkit whose nvcc answers --version and --list-gpu-arch like nvcc `release`."""
    kit = _fake_toolkit(root)
    listing = "\\n".join(f"compute_{a}" for a in archs.split())
    (kit / "bin" / "nvcc").write_text(
        "#!/bin/sh\n"
        f'case "$1" in\n'
        f'  --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
        f'  --list-gpu-arch) printf "{listing}\\n";;\n'
        "esac\n")
    return kit


needs_cuda_torch = pytest.mark.skipif(
    __import__("torch").version.cuda is None, reason="torch here is not a CUDA build: setup.py builds no CUDA sources")


@needs_cuda_torch
@pytest.mark.parametrize("arch, says", [
    ("native", "none is visible here"),  # torch: IndexError: list index out of range
    ("7.0", "cannot compile for"),        # in torch's list, not in nvcc 13's: nvcc failed mid-build
    ("sm_90", "Unknown CUDA arch"),
])
def test_torch_cuda_arch_list_is_checked_before_compiling(tmp_path, arch, says):
    kit = _versioned_toolkit(tmp_path, release=__import__("torch").version.cuda)
    proc = _run_setup({"CUDA_HOME": str(kit), "TORCH_CUDA_ARCH_LIST": arch, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"TORCH_CUDA_ARCH_LIST={arch!r}" in proc.stderr or f"TORCH_CUDA_ARCH_LIST={arch}" in proc.stderr
    assert says in proc.stderr, proc.stderr


@needs_cuda_torch
def test_valid_arch_list_passes(tmp_path, clean_env):
    kit = _versioned_toolkit(tmp_path)
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX")
    _load_setup().check_arch_list(str(kit))  # no SystemExit


@needs_cuda_torch
def test_cuda_home_that_is_not_a_toolkit_stops_a_cuda_build(tmp_path):
    # It built the CPU kernels only, saying so only in output pip hides: CUDA_HOME names the toolkit the user wants.
    proc = _run_setup({"CUDA_HOME": str(tmp_path)})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in proc.stderr and "DEEPLAB_OPS_CUDA=0" in proc.stderr
    assert _run_setup({"CUDA_HOME": str(tmp_path), "DEEPLAB_OPS_CUDA": "0"}).returncode == 0


def test_toolkit_of_another_cuda_major_is_not_used(tmp_path, clean_env):
    # torch stops a build whose nvcc's major version differs from its own CUDA's, after setup.py chose to build the
    # CUDA sources: "unset" means build them when they can be built.
    import torch

    setup = _load_setup()
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setenv("CUDA_HOME", str(_versioned_toolkit(tmp_path, release="12.4")))
    clean_env.delenv("DEEPLAB_OPS_CUDA", raising=False)
    assert setup.cuda_decision() == (False, None)
    assert "CUDA 12.4" in setup.BUILD["cuda_reason"] and "CUDA 13.0" in setup.BUILD["cuda_reason"]
    clean_env.setenv("DEEPLAB_OPS_CUDA", "1")
    with pytest.raises(SystemExit, match="CUDA 12.4"):
        setup.cuda_decision()


def test_pip_isolated_build_against_another_torch_is_refused(tmp_path):
    # `pip install -e .` without --no-build-isolation downloaded torch (pyproject's build requires) into
    # pip-build-env-*, built against it (a CUDA build if nvcc was found, though the environment's torch was CPU-only)
    # and installed an extension that does not load with the environment's torch.
    fake = tmp_path / "pip-build-env-abc" / "overlay" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9+cu999'\nclass version:\n    cuda = '99.0'\n")
    proc = _run_setup({}, pythonpath=str(fake.parent))
    assert proc.returncode != 0
    assert "isolated environment" in proc.stderr and "9.9.9+cu999" in proc.stderr, proc.stderr
    assert "pip install --no-build-isolation -e ." in proc.stderr
    import torch

    setup = _load_setup()
    assert setup.isolated_build_problem(str(fake / "__init__.py"), torch.__version__) is None  # the same torch: fine
    assert setup.isolated_build_problem(torch.__file__, "9.9.9") is None  # not an isolated build


def test_sdist_carries_every_source_and_header(tmp_path):
    # setuptools put only the compiled sources of the building machine in the sdist: no header (every build from it
    # failed), and on a CPU-only machine no CUDA source.
    import shutil
    import tarfile

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "train.py"):
        shutil.copy(ROOT / name, tree / name)
    for name in ("csrc", "deeplab_ops", "model", "training"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.json"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          env={**os.environ, "DEEPLAB_OPS_CUDA": "0"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted.add("train.py")  # installed as the module `train` (pyproject.toml's py-modules)
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"


def test_build_records_what_it_built(tmp_path, clean_env, monkeypatch):
    """build_ext writes what was built beside the extension; `python -m deeplab_ops` shows why no CUDA kernels (it
    said "CUDA C++ kernels: no", and the cuda backend's hint told to rebuild where a toolkit is found, on a machine
    that has one, for a build made with DEEPLAB_OPS_CUDA=0)."""
    import json

    from setuptools import Distribution, Extension
    from setuptools.command import build_ext

    from deeplab_ops.__main__ import _build_lines

    setup = _load_setup()
    clean_env.setenv("DEEPLAB_OPS_CUDA", "0")
    setup.cuda_decision()
    monkeypatch.setattr(build_ext.build_ext, "run", lambda self: None)  # compile nothing
    cmd = setup.build_ext_class()(Distribution({"name": "x", "ext_modules": [Extension("deeplab_ops._C", [])]}))
    cmd.initialize_options()
    cmd.build_lib = str(tmp_path)
    cmd.finalize_options()
    cmd.run()
    info = json.loads((tmp_path / "deeplab_ops" / _extension.BUILD_INFO).read_text())
    import torch

    assert info["torch"] == torch.__version__ and info["cuda_kernels"] is False
    assert info == _extension.build_info(str(tmp_path / "deeplab_ops"))
    lines = _build_lines(False, info)
    assert "CUDA C++ kernels: no (DEEPLAB_OPS_CUDA=0 at build time)" in lines[0]
    assert f"torch {torch.__version__}" in lines[1]


def test_extension_built_against_another_torch_is_not_loaded(tmp_path):
    # An extension built against another torch may load without an error and then crash; the error named no versions.
    import json

    (tmp_path / "_C.abi3.so").write_bytes(b"")  # never loaded: refused first
    (tmp_path / _extension.BUILD_INFO).write_text(json.dumps({"torch": "2.0.0+cpu"}))
    with pytest.raises(ImportError, match=r"built against torch 2\.0\.0\+cpu, but this is torch .*must be rebuilt"):
        _extension.load(str(tmp_path))
    import torch

    assert _extension.stale_build_message({"torch": torch.__version__}) is None
    assert _extension.stale_build_message(None) is None


def test_python_m_deeplab_ops_reports_a_missing_or_stale_extension(tmp_path):
    """`python -m deeplab_ops` is the check to run when the build is wrong: runpy imports the package before its
    __main__, so a missing or stale _C gave a traceback and no report. It reports the reason (exit 1); `import
    deeplab_ops` still raises it."""
    import shutil

    pkg = tmp_path / "deeplab_ops"
    shutil.copytree(ROOT / "deeplab_ops", pkg, ignore=shutil.ignore_patterns("_C*", "_build_info.json", "__pycache__"))
    import torch

    # -S: no site processing, so no editable install's finder or .pth (CI's `pip install -e .`) can put the
    # repository's deeplab_ops before the copy; torch and the rest come from their site-packages, given directly.
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": f"{tmp_path}:{site_packages}"}

    def run(*args):
        return subprocess.run([sys.executable, "-S", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    report = run("-m", "deeplab_ops")
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr[-2000:]
    assert "deeplab_ops  cannot be imported: deeplab_ops: the compiled extension deeplab_ops._C is missing" in \
        report.stdout, report.stdout
    imported = run("-c", "import deeplab_ops")
    assert imported.returncode == 1 and "ImportError: deeplab_ops: the compiled extension" in imported.stderr

    so = next(p for p in (ROOT / "deeplab_ops").iterdir() if p.name.startswith("_C") and p.suffix == ".so")
    shutil.copy(so, pkg / so.name)
    (pkg / "_build_info.json").write_text('{"torch": "1.0.0", "cuda_kernels": false}')
    report = run("-m", "deeplab_ops")
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr[-2000:]
    assert "was built against torch 1.0.0" in report.stdout and "built with   torch 1.0.0" in report.stdout


def test_editable_installs_keep_their_objects(tmp_path, clean_env, monkeypatch):
    """`pip install -e .` compiled every source again each time: setuptools gives an editable build a new temporary
    build_temp, where ninja finds no objects. build_ext keeps them in a folder of the source tree, one per Python,
    torch and CUDA decision; other builds keep the build_temp setuptools gives them."""
    import torch
    from setuptools import Distribution, Extension

    setup = _load_setup()
    clean_env.setenv("DEEPLAB_OPS_CUDA", "0")
    setup.cuda_decision()

    def finalized(editable: bool):
        cmd = setup.build_ext_class()(Distribution({"name": "x", "ext_modules": [Extension("deeplab_ops._C", [])]}))
        cmd.initialize_options()
        cmd.build_temp = str(tmp_path / "setuptools-temp")  # what setuptools' editable_wheel passes
        cmd.editable_mode = editable
        cmd.finalize_options()
        return cmd.build_temp

    kept = finalized(True)
    assert kept == finalized(True)  # the same folder for the next install
    assert Path(kept).parent == ROOT / "build"
    assert sys.implementation.cache_tag in kept and torch.__version__.split("+")[0] in kept and kept.endswith("-cpu")
    assert finalized(False) == str(tmp_path / "setuptools-temp")
