"""Fetch transformers' own common test mixins (``tests/`` of its PyPI sdist) for the installed version.

transformers publishes ``ModelTesterMixin`` (``tests/test_modeling_common.py``) and ``ConfigTester``
(``tests/test_configuration_common.py``) in its source distribution, not in its wheel. :func:`load` downloads the
sdist of exactly the installed ``transformers.__version__`` with pip (once; it is cached), extracts only its
``tests/`` folder and makes it importable as the package ``transformers_tests`` -- a name that cannot clash
with this project's own ``tests`` folder. Their files are used as shipped, nothing in them is rewritten.

Cache folder: ``$MODELING_DEEPSEEK_V3_TRANSFORMERS_TESTS`` if set, else
``~/.cache/modeling_deepseek_v3/transformers-tests-<version>``. It holds::

    transformers_tests/   the sdist's tests/ (plus an empty __init__.py: the sdist ships none)
    site/                 test-only dependencies of those files that are not installed here (``parameterized``)

The sdist carries only the top-level ``tests/*.py``; a few modules they import live in sub-folders of
transformers' repository that are not shipped. :class:`_StandInFinder` supplies minimal stand-ins for exactly
those, and only when the real file is absent (it sits last on ``sys.meta_path``):

* ``transformers_tests.generation.test_utils.GenerationTesterMixin`` -- an empty marker class. The
  generation tests themselves are therefore not run (ModelTesterMixin only uses the name in ``issubclass``).
* ``transformers_tests.exporters.test_export.ExportTesterMixin`` -- an empty base class (no export tests).
* ``transformers_tests.utils.test_configuration_utils.config_common_kwargs`` -- a dict of generic
  ``PreTrainedConfig`` arguments with non-default values, written here, for ``ConfigTester``'s
  "arguments are stored" check.
* ``transformers_tests.distributed_testing_utils`` -- the multi-process harness of the distributed mixins
  (``test_expert_parallel_mixin``, ``test_fsdp_mixin``, ``test_tensor_parallel_mixin``), written here from how
  they call it:

  - ``_get_distributed_device_type()`` / ``_get_distributed_backend()``: ``"cpu"`` / ``"gloo"`` (``"cuda"`` /
    ``"nccl"`` only when transformers' test device is CUDA); ``_get_rank_device(rank)`` the rank's
    ``torch.device``; ``_set_rank_device(rank)`` selects it (nothing to select on the CPU).
  - ``_start_rank_processes(fn, args=(), nprocs=N)``: ``fn(rank, *args)`` in ``N`` processes started with
    ``torch.multiprocessing``, which set up their process group themselves. They come from a fork server that
    imported torch, transformers and this package once (``spawn`` where there is no fork server): a fresh
    interpreter per rank would pay seconds of imports on every launch. Each child takes the caller's
    environment, installs these stand-ins before it unpickles ``fn`` (the mixin modules import this one) and
    runs with ``max(1, cpus // N)`` intra-op threads. Returns when all exited cleanly; a rank that raised, crashed or
    outlived ``$MODELING_DEEPSEEK_V3_RANK_TIMEOUT_S`` (default 900 s) fails the caller with a
    :class:`RankFailure` carrying that rank's traceback (the other ranks are terminated).
  - ``run_distributed(world_size=N)(fn)(*args, **kwargs)``: the same launch, with each rank's default process
    group already initialised (rendezvous on a store the caller holds, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT`` set as a launcher sets them) and destroyed after ``fn(rank, *args,
    **kwargs)`` returns.

Any failure to get the files (no network, pip error) raises :class:`TransformersTestsUnavailable`, whose
message says why; the test module turns it into a module-level skip.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
CACHE_ENV = "MODELING_DEEPSEEK_V3_TRANSFORMERS_TESTS"
TEST_DEPENDENCIES = ("parameterized>=0.9",)  # what their tests/ import beyond transformers' own dependencies
PIP_TIMEOUT_S = 600


class TransformersTestsUnavailable(RuntimeError):
    """transformers' test files could not be fetched or imported; the message says why."""


def cache_dir(version: str | None = None) -> Path:
    version = version or transformers.__version__
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path("~/.cache/modeling_deepseek_v3").expanduser() / f"transformers-tests-{version}"


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransformersTestsUnavailable(f"`{' '.join(cmd[2:])}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise TransformersTestsUnavailable(f"`{' '.join(cmd[2:])}` failed: {' | '.join(tail)}")


def _extract_tests(sdist: Path, version: str, target: Path) -> None:
    """Extract ``<sdist root>/tests/**`` into ``target`` (regular files only, no path escapes)."""
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name
            if not name.startswith(prefix) or not member.isfile():
                continue
            rel = name[len(prefix) :]
            if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                continue
            members.append((member, rel))
        if not any(rel == "test_modeling_common.py" for _, rel in members):
            raise TransformersTestsUnavailable(f"{sdist.name} has no tests/test_modeling_common.py")
        for member, rel in members:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    # transformers' repository has an (empty) tests/__init__.py, the sdist does not; test_configuration_common
    # also executes it through `direct_transformers_import(Path(__file__).parent)`.
    init = target / "__init__.py"
    if not init.exists():
        init.write_text("")


def _fetch(root: Path, version: str) -> None:
    """Download the sdist and extract its tests/ into ``root/transformers_tests`` (atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        _pip(
            "download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "-q", "-d", str(tmp), cwd=tmp,
        )  # fmt: skip
        sdists = sorted(tmp.glob("transformers-*.tar.gz"))
        if not sdists:
            raise TransformersTestsUnavailable(f"pip saved no transformers-{version}.tar.gz")
        staged = tmp / PACKAGE
        staged.mkdir()
        _extract_tests(sdists[0], version, staged)
        try:
            os.replace(staged, root / PACKAGE)
        except OSError:
            if not (root / PACKAGE / "test_modeling_common.py").exists():  # else: a parallel fetch won
                raise


def _ensure_dependencies(root: Path) -> None:
    site = root / "site"
    missing = []
    for requirement in TEST_DEPENDENCIES:
        module = requirement.split(">")[0].split("=")[0].split("<")[0]
        if importlib.util.find_spec(module) is None and not (site / module).exists():
            missing.append(requirement)
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".site-") as tmp:
            _pip(
                "install", "--no-deps", "--disable-pip-version-check", "-q", "--target", tmp, *missing,
                cwd=root,
            )  # fmt: skip
            site.mkdir(exist_ok=True)
            for entry in Path(tmp).iterdir():
                dest = site / entry.name
                if not dest.exists():
                    os.replace(entry, dest)
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
        importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------------
# Stand-ins for the modules their top-level files import from folders the sdist does not ship
# ---------------------------------------------------------------------------------------------------

# Arguments every PreTrainedConfig stores, each with a value differing from its default.
_CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["SomeArchitecture"],
    "finetuning_task": "classification",
    "id2label": {0: "first", 1: "second"},
    "label2id": {"first": 0, "second": 1},
    "problem_type": "regression",
    "tokenizer_class": "SomeTokenizer",
    "prefix": "summarize: ",
    "sep_token_id": 7,
    "decoder_start_token_id": 11,
    "is_decoder": True,
    "cross_attention_hidden_size": 32,
    "add_cross_attention": True,
    "tie_encoder_decoder": True,
}


def _standin_generation(module) -> None:
    class GenerationTesterMixin:
        """Stand-in: transformers' generation test mixin is not in the sdist; no generation test runs."""

    module.GenerationTesterMixin = GenerationTesterMixin


def _standin_export(module) -> None:
    class ExportTesterMixin:
        """Stand-in: transformers' export test mixin is not in the sdist; no export test runs."""

    module.ExportTesterMixin = ExportTesterMixin


def _standin_config_utils(module) -> None:
    module.config_common_kwargs = dict(_CONFIG_COMMON_KWARGS)


# -- the distributed harness (``distributed_testing_utils``) -----------------------------------------------

RANK_TIMEOUT_ENV = "MODELING_DEEPSEEK_V3_RANK_TIMEOUT_S"
RANK_TIMEOUT_S = 900.0


class RankFailure(AssertionError):
    """A rank process of a distributed test raised, crashed or ran past the timeout; the message says which
    rank and carries its traceback."""


def _uses_cuda() -> bool:
    import torch
    from transformers.testing_utils import torch_device

    return torch_device == "cuda" and torch.cuda.is_available()


def _distributed_device_type() -> str:
    return "cuda" if _uses_cuda() else "cpu"


def _distributed_backend() -> str:
    return "nccl" if _uses_cuda() else "gloo"


def _rank_device(rank: int):
    import torch

    if _uses_cuda():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _select_rank_device(rank: int) -> None:
    import torch

    if _uses_cuda():
        torch.cuda.set_device(_rank_device(rank))


# What a fork server imports once, so that each rank starts without seconds of imports (a rank only forks it).
_RANK_PRELOAD = ["torch", "torch.distributed", "transformers", "modeling_deepseek_v3", __name__]


def _start_method() -> str:
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _rank_main(rank: int, payload: bytes, environ: dict, nprocs: int) -> None:
    """Entry point of a rank process: the caller's environment, ``transformers_tests`` (and these stand-ins)
    importable, then the pickled ``fn(rank, *args)``. ``fn`` is unpickled only here: the mixin module that defines
    it imports ``distributed_testing_utils``, which a fresh interpreter finds only once :func:`load` has run."""
    import pickle

    import torch

    os.environ.clear()
    os.environ.update(environ)  # a fork server's children would otherwise see the server's environment
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    load()
    fn, args = pickle.loads(payload)
    fn(rank, *args)


def _rank_timeout_s() -> float:
    value = os.environ.get(RANK_TIMEOUT_ENV)
    return float(value) if value else RANK_TIMEOUT_S


def _start_processes(fn, args=(), nprocs: int = 1, *, name: str | None = None) -> None:
    """``fn(rank, *args)`` for rank 0..nprocs-1, each in its own process; raise :class:`RankFailure` with the
    failing rank's traceback when one raises, dies or outlives the timeout (``name``: what the messages call it)."""
    import pickle
    import time

    import torch.multiprocessing as mp

    name = name or getattr(fn, "__qualname__", repr(fn))

    method = _start_method()
    if method == "forkserver":
        import multiprocessing

        multiprocessing.get_context(method).set_forkserver_preload(_RANK_PRELOAD)  # no effect once it runs
    payload = pickle.dumps((fn, tuple(args)))
    context = mp.start_processes(
        _rank_main, args=(payload, dict(os.environ), nprocs), nprocs=nprocs, join=False, start_method=method
    )
    timeout = _rank_timeout_s()
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                raise RankFailure(
                    f"{name} on {nprocs} ranks: rank(s) {alive} still running after "
                    f"{timeout:g} s (${RANK_TIMEOUT_ENV}); a collective that not every rank reached hangs like this"
                )
    except mp.ProcessRaisedException as error:
        raise RankFailure(f"{name}: rank {error.error_index} of {nprocs} raised:\n{error.msg}") from None
    except mp.ProcessExitedException as error:
        signal = f", signal {error.signal_name}" if error.signal_name else ""
        raise RankFailure(
            f"{name}: rank {error.error_index} of {nprocs} died (exit code {error.exit_code}{signal}) before it could "
            "report a Python error; its stderr, above, may say why"
        ) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _with_process_group(rank, world_size, host, port, fn, args, kwargs):
    """One rank of :func:`_run_distributed`: join the default process group, run ``fn``, leave the group."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=host, MASTER_PORT=str(port),
    )  # fmt: skip
    _select_rank_device(rank)
    store = dist.TCPStore(host, port, world_size=None, is_master=False)
    dist.init_process_group(backend=_distributed_backend(), store=store, rank=rank, world_size=world_size)
    try:
        fn(rank, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def _run_distributed(world_size: int):
    """``run_distributed(world_size=N)(fn)(*args, **kwargs)``: ``fn(rank, *args, **kwargs)`` on ``N`` ranks, each
    inside an initialised default process group (see the module docstring)."""
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def launch(*args, **kwargs):
            import torch.distributed as dist

            # The rendezvous server lives in this process for the whole run, on a port the OS picked.
            server = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
            try:
                _start_processes(
                    _with_process_group,
                    args=(world_size, "127.0.0.1", server.port, fn, args, kwargs),
                    nprocs=world_size,
                    name=getattr(fn, "__qualname__", repr(fn)),
                )
            finally:
                del server

        return launch

    return decorate


def _standin_distributed_testing_utils(module) -> None:
    module._get_distributed_device_type = _distributed_device_type
    module._get_distributed_backend = _distributed_backend
    module._get_rank_device = _rank_device
    module._set_rank_device = _select_rank_device
    module._start_rank_processes = _start_processes
    module.run_distributed = _run_distributed
    module.RankFailure = RankFailure


_STANDIN_MODULES = {
    f"{PACKAGE}.generation.test_utils": _standin_generation,
    f"{PACKAGE}.exporters.test_export": _standin_export,
    f"{PACKAGE}.utils.test_configuration_utils": _standin_config_utils,
    f"{PACKAGE}.distributed_testing_utils": _standin_distributed_testing_utils,
}
_STANDIN_PACKAGES = {name.rsplit(".", 1)[0] for name in _STANDIN_MODULES} - {PACKAGE}


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        fill = _STANDIN_MODULES.get(module.__name__)
        if fill is not None:
            fill(module)


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Answers only for the stand-in names, and only after the regular finders found no real file."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _STANDIN_MODULES:
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin="stand-in")
        if fullname in _STANDIN_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin="stand-in", is_package=True)
        return None


def standins_in_use() -> list[str]:
    """Names of the stand-in modules that were imported (the sdist had no real file for them)."""
    return sorted(
        name
        for name, module in sys.modules.items()
        if name in _STANDIN_MODULES and getattr(getattr(module, "__spec__", None), "origin", None) == "stand-in"
    )


def load(version: str | None = None) -> Path:
    """Make ``transformers_tests`` importable (fetching it if needed); return the cache folder."""
    version = version or transformers.__version__
    root = cache_dir(version)
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        _fetch(root, version)
    _ensure_dependencies(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not any(isinstance(finder, _StandInFinder) for finder in sys.meta_path):
        sys.meta_path.append(_StandInFinder())
    importlib.invalidate_caches()
    existing = sys.modules.get(PACKAGE)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").parent != root / PACKAGE:
        raise TransformersTestsUnavailable(f"another module named {PACKAGE!r} is already imported: {existing!r}")
    return root


def import_module(name: str):
    """``import transformers_tests.<name>``, reporting any failure as :class:`TransformersTestsUnavailable`."""
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as exc:
        raise TransformersTestsUnavailable(f"transformers' tests/{name}.py could not be imported: {exc}") from exc
