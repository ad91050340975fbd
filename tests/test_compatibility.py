"""The supported transformers range: declared once, locked at both ends, checked on import, also by remote code."""

import configparser
import subprocess
import textwrap
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from transformers_anymal.compatibility_anymal import OLDEST_SUPPORTED, SUPPORTED_RANGE, check_transformers_version

import child_process


ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"newest": ROOT / "requirements" / "lock.txt", "oldest": ROOT / "requirements" / "lock-oldest.txt"}


def declared_requirements() -> dict[str, Requirement]:
    """install_requires and every extra of setup.cfg, by package name."""
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    lines = options["options"]["install_requires"].splitlines()
    lines += [line for extra in options["options.extras_require"].values() for line in extra.splitlines()]
    return {(requirement := Requirement(line)).name.lower(): requirement for line in lines if line.strip()}


def pinned(lock: Path) -> dict[str, Version]:
    pins = (line.split("==") for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    return {name.lower().replace("_", "-"): Version(version) for name, version in pins}


def test_setup_cfg_declares_the_range_the_code_checks():
    assert declared_requirements()["transformers"].specifier == SpecifierSet(SUPPORTED_RANGE)
    assert Version(transformers.__version__) in declared_requirements()["transformers"].specifier


@pytest.mark.parametrize("end", LOCKS)
def test_each_lock_pins_every_dependency_inside_its_declared_range(end):
    pins = pinned(LOCKS[end])
    for name, requirement in declared_requirements().items():
        name = name.replace("_", "-")
        assert name in pins, f"{LOCKS[end].name} does not pin {name}"
        assert pins[name] in requirement.specifier, f"{LOCKS[end].name}: {name}=={pins[name]} is outside {requirement}"


def test_the_locks_sit_at_both_ends_of_the_transformers_range():
    newest, oldest = (pinned(LOCKS[end])["transformers"] for end in ("newest", "oldest"))
    assert oldest == Version(OLDEST_SUPPORTED) and newest > oldest


def test_too_old_a_transformers_is_refused_with_the_command_that_fixes_it():
    with pytest.raises(ImportError, match=r"needs transformers >=5\.23\.0,<5\.25\.0, but 5\.22\.2 is installed\. "
                                          r"Run: pip install 'transformers>=5\.23\.0,<5\.25\.0'"):
        check_transformers_version("5.22.2")


@pytest.mark.parametrize("version", ["5.25.0", "5.25.0.dev0", "6.1.0"])
def test_a_newer_transformers_warns_naming_the_tested_range(version):
    with pytest.warns(UserWarning, match=rf"transformers {version} is newer .*tested with \(>=5\.23\.0,<5\.25\.0\)"):
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.23.0", "5.24.0", "5.24.3"])
def test_a_supported_transformers_passes_silently(version, recwarn):
    check_transformers_version(version)
    assert not recwarn.list


def run_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return child_process.run_python("-c", textwrap.dedent(code), check=False, timeout=300, cwd=cwd)


def test_importing_the_package_logs_nothing():  # no warning, no `@auto_docstring` error about our signatures
    result = run_python("import transformers_anymal")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_an_untested_transformers_warns_once_on_import():
    result = run_python("""
        import warnings
        warnings.simplefilter("always")  # every warning, not once per place
        import transformers
        transformers.__version__ = "5.31.0"
        import transformers_anymal, transformers_anymal.modeling_anymal, transformers_anymal.processing_anymal
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("transformers 5.31.0 is newer") == 1, result.stderr


def test_remote_code_checks_the_installed_transformers(tmp_path):
    saved = run_python(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from anymal_tester import tiny_model
        tiny_model().save_pretrained({str(tmp_path / "checkpoint")!r})
    """)
    assert saved.returncode == 0, saved.stderr
    assert (tmp_path / "checkpoint" / "compatibility_anymal.py").exists()
    loaded = run_python(f"""
        import sys
        sys.modules["transformers_anymal"] = None  # only transformers: the code comes from the checkpoint
        import transformers
        transformers.__version__ = "5.20.0"
        from transformers import AutoModelForMultimodalLM
        AutoModelForMultimodalLM.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True)
    """, cwd=tmp_path)
    assert loaded.returncode != 0
    assert f"Run: pip install 'transformers{SUPPORTED_RANGE}'" in loaded.stderr, loaded.stderr[-3000:]

