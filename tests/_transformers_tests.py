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


_STANDIN_MODULES = {
    f"{PACKAGE}.generation.test_utils": _standin_generation,
    f"{PACKAGE}.exporters.test_export": _standin_export,
    f"{PACKAGE}.utils.test_configuration_utils": _standin_config_utils,
}
_STANDIN_PACKAGES = {name.rsplit(".", 1)[0] for name in _STANDIN_MODULES}


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
